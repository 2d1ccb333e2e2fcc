"""Socket helpers shared by the receive and send paths."""

from __future__ import annotations

import socket
from collections.abc import Iterable


def shutdown_all(socks: Iterable[socket.socket]) -> None:
    """Shut both directions of every socket, so threads blocked on them wake up and fail."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
