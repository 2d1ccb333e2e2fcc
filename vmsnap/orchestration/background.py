"""Ending a failed or interrupted background save without freezing the guest.

QEMU before 8.1 (fixed by commit 3a8b81f2e6, "stop tracking ram writes when cancelling
background migration") releases the write protection of guest RAM only when a background
snapshot completes: cancelled or failed part-way, it leaves the pages not yet copied
protected, and the guest freezes at its next write to one of them (seen here with 7.2.22:
`migrate_cancel` left the bootguest running but silent for good). So on such a QEMU vmsnap
never cuts a background save short: it stops storing and reads the rest of the stream into
nowhere until QEMU completes; then the guest runs on and the partial file is removed.
"""

from __future__ import annotations

import asyncio
import socket

from ..fileformat.writer import SnapshotWriter
from ..ops.receive import ReceiveStats
from .modes import SaveMode
from .qmp import Peer

FIXED_IN = (8, 1)
#: Give up draining when QEMU sends nothing for this long.
IDLE_TIMEOUT = 60.0


def must_complete(peer: Peer, mode: SaveMode) -> bool:
    return mode is SaveMode.BACKGROUND and peer.version[:2] < FIXED_IN


async def complete_into_nowhere(writer: SnapshotWriter, conns: list[socket.socket],
                                receiver: asyncio.Future[ReceiveStats] | None) -> None:
    """Let QEMU finish the background snapshot; keep none of it."""
    writer.abandon()  # the receiver stops storing at its next page and drains (_receive)
    if receiver is not None:
        await asyncio.gather(receiver, return_exceptions=True)
    elif conns:
        await asyncio.get_running_loop().run_in_executor(None, drain, conns[0])


def drain(conn: socket.socket) -> None:
    """Read and drop the rest of the stream until QEMU closes it (or goes silent)."""
    conn.settimeout(IDLE_TIMEOUT)
    buf = bytearray(1 << 20)
    try:
        while conn.recv_into(buf):
            pass
    except OSError:  # QEMU gone or silent: nothing more to wait for
        pass
