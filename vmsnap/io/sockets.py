"""Socket helpers shared by the receive and send paths."""

from __future__ import annotations

import fcntl
import socket
import sys
import termios
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: SO_SNDBUFFORCE / SO_RCVBUFFORCE (Linux; root may exceed net.core.*mem_max).
_FORCE = {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}
SOCKET_BUFFER = 8 << 20
#: A batched read that found less than this ...
BATCH = 1 << 20
#: ... sleeps this long, at most, then takes whatever came meanwhile (seconds) ...
BATCH_WAIT = 0.002
#: ... or less: the writer must not fill its send buffer in the meantime (bytes/s).
FASTEST_WRITER = 2e9


def shutdown_all(socks: Iterable[socket.socket]) -> None:
    """Shut both directions of every socket, so threads blocked on them wake up and fail."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def widen(*socks: socket.socket) -> int:
    """Give each socket 8 MiB send and receive buffers (208 KiB by default: a writer would
    block every few dozen KiB); beyond net.core.*mem_max only as root. Returns the smallest
    send buffer the kernel granted."""
    for sock in socks:
        for opt, force in _FORCE.items():
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return min(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in socks)


def limit_queue(sock: socket.socket, nbytes: int) -> int:
    """Make a blocking send on `sock` wait while about `nbytes` it sent are unread (a unix
    socket's send buffer is what its peer has not read yet) and go on once a quarter of
    that is left (unix_writable): the sender sleeps in the kernel instead of polling the
    queue, one wake-up per 3/4 of `nbytes` read. Beyond net.core.wmem_max only as root
    (less otherwise: a shorter queue). Returns the limit granted."""
    try:  # the kernel doubles the value, for its bookkeeping
        sock.setsockopt(socket.SOL_SOCKET, _FORCE[socket.SO_SNDBUF], nbytes // 2)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes // 2)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


class BatchedReader(socket.SocketIO):
    """An unbuffered binary file on a blocking stream socket whose reads come in batches.

    A writer that sends small pieces (QEMU's background snapshot flushes every 4 KiB page
    on its own) wakes a reader blocked on a unix socket for every piece, and every read
    costs the decoder its fixed overhead and the file one small write. Here a read that
    finds less than BATCH waits for the first bytes, sleeps a moment (no wake-ups) and
    takes what came meanwhile. `peer_sndbuf`: the writer's send buffer, which bounds the
    sleep (the writer must not block on a full buffer while the reader sleeps)."""

    def __init__(self, sock: socket.socket, peer_sndbuf: int):
        super().__init__(sock, "rb")
        self.sock = sock
        self.wait = min(BATCH_WAIT, peer_sndbuf / 4 / FASTEST_WRITER)

    def readinto(self, b: WriteableBuffer) -> int | None:
        n = super().readinto(b)
        view = memoryview(b).cast("B")
        if not n or n >= min(BATCH, view.nbytes) or self.wait < 1e-4:
            return n
        time.sleep(self.wait)
        try:
            return n + self.sock.recv_into(view[n:], 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return n


def unsent(sock: socket.socket) -> int:
    """Bytes sent on `sock` that its peer has not read yet (SIOCOUTQ; for a unix socket,
    the memory its queued buffers take)."""
    got = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(got, sys.byteorder, signed=True)
