"""BatchedReader: a writer sending 4 KiB pieces (QEMU's background snapshot) is read in
big batches, and nothing is lost, delayed for good or read past the end."""

from __future__ import annotations

import socket
import subprocess
import sys

from vmsnap.io.sockets import BATCH, BatchedReader, widen

PIECE = 4096 + 12  # a page record as QEMU's background snapshot flushes it
WRITER = f"""
import os, sys, time
fd, n = map(int, sys.argv[1:])
for i in range(n):
    os.write(fd, i.to_bytes(4, "big") * {PIECE // 4})
    t = time.perf_counter()
    while time.perf_counter() - t < 20e-6:
        pass
"""


def test_small_pieces_arrive_in_big_reads():
    ours, theirs = socket.socketpair()
    sndbuf = widen(ours, theirs)
    pieces = 4000  # 16 MiB, written by another process (as QEMU does), 20 us apart
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(theirs.fileno()), str(pieces)],
                              pass_fds=[theirs.fileno()])
    theirs.close()
    reader = BatchedReader(ours, sndbuf)
    buf, got, reads = bytearray(8 << 20), bytearray(), 0
    while n := reader.readinto(buf):
        got += buf[:n]
        reads += 1
    assert writer.wait() == 0
    ours.close()
    data = b"".join(i.to_bytes(4, "big") * (PIECE // 4) for i in range(pieces))
    assert got == data
    assert reads < pieces // 8, reads  # one read per piece without batching


def test_a_quiet_writer_is_not_kept_waiting():
    """Less than a batch and then nothing: the read returns what came, at once."""
    ours, theirs = socket.socketpair()
    reader = BatchedReader(ours, widen(ours, theirs))
    theirs.sendall(b"x" * 100)
    buf = bytearray(BATCH)
    assert reader.readinto(buf) == 100
    theirs.shutdown(socket.SHUT_WR)
    assert reader.readinto(buf) == 0
    ours.close()
    theirs.close()
