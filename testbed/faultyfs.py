"""A disk that fails: one file served through FUSE (root only), whose reads of a chosen byte
range fail with EIO while `failing` is set, as a bad sector's would; every other byte is
the real file's. No FUSE library: the kernel's protocol, the few requests a reader makes.

Reads bypass the page cache (FOPEN_DIRECT_IO), so each one reaches this server: a range
that failed reads again once `failing` is cleared.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header
_OUT = struct.Struct("<IiQ")  # fuse_out_header
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
_ENTRY = struct.Struct("<QQQQII")  # fuse_entry_out before its fuse_attr
_READ = struct.Struct("<QQI")  # fuse_read_in: fh, offset, size
LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE, FLUSH, INIT, BATCH_FORGET = \
    1, 2, 3, 14, 15, 17, 18, 25, 26, 42
INTERRUPT, DESTROY = 36, 38
FOPEN_DIRECT_IO = 1
ROOT, FILE = 1, 2
MAX_READ = 128 << 10
_libc = ctypes.CDLL(None, use_errno=True)


class FaultyFile:
    """The file `real` served as `mount / name`; reads touching [start, end) fail with
    EIO while `failing` is set."""

    def __init__(self, real: Path, mount: Path, start: int, end: int) -> None:
        self.real, self.mount, self.start, self.end = real, mount, start, end
        self.failing = threading.Event()
        self.failed_reads = 0
        self._fd = os.open(real, os.O_RDONLY)
        self._dev = os.open("/dev/fuse", os.O_RDWR)

    def _attr(self, node: int) -> bytes:
        if node == ROOT:
            return _ATTR.pack(ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o700, 2, 0, 0, 0,
                              4096, 0)
        st = os.fstat(self._fd)
        return _ATTR.pack(FILE, st.st_size, st.st_blocks, 0, 0, 0, 0, 0, 0,
                          stat.S_IFREG | 0o600, 1, 0, 0, 0, 4096, 0)

    def _answer(self, opcode: int, node: int, body: bytes) -> bytes | int | None:
        """The reply's body, an errno, or None (no reply)."""
        if opcode == INIT:
            major, minor = struct.unpack_from("<II", body)
            return struct.pack("<IIIIHHIIHHI", 7, min(minor, 31), MAX_READ, 0, 16, 12,
                               MAX_READ, 1, MAX_READ // 4096, 0, 0) + bytes(28)
        if opcode == LOOKUP:
            if node != ROOT or body.rstrip(b"\0") != self.real.name.encode():
                return errno.ENOENT
            return _ENTRY.pack(FILE, 0, 0, 0, 0, 0) + self._attr(FILE)
        if opcode == GETATTR:
            return struct.pack("<QII", 0, 0, 0) + self._attr(node)
        if opcode == OPEN:
            return struct.pack("<QII", 0, FOPEN_DIRECT_IO, 0)
        if opcode == READ:
            _fh, offset, size = _READ.unpack_from(body)
            if self.failing.is_set() and offset < self.end and self.start < offset + size:
                self.failed_reads += 1
                return errno.EIO
            return os.pread(self._fd, size, offset)
        if opcode == STATFS:
            return bytes(80)
        if opcode in (RELEASE, FLUSH):
            return b""
        if opcode in (FORGET, BATCH_FORGET, INTERRUPT, DESTROY):
            return None
        return errno.ENOSYS

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._dev, MAX_READ + 4096)
            except OSError:  # ENODEV: unmounted
                return
            _len, opcode, unique, node, *_ = _IN.unpack_from(request)
            answer = self._answer(opcode, node, request[_IN.size:])
            if answer is None:
                continue
            error, data = (-answer, b"") if isinstance(answer, int) else (0, answer)
            try:
                os.write(self._dev, _OUT.pack(_OUT.size + len(data), error, unique) + data)
            except OSError:  # the request was interrupted meanwhile (ENOENT), or unmounted
                pass

    @contextmanager
    def mounted(self) -> Iterator[Path]:
        """The file's path under the mount, served while the context lasts."""
        self.mount.mkdir(mode=0o700)
        options = f"fd={self._dev},rootmode=40000,user_id=0,group_id=0"
        if _libc.mount(b"faultyfs", os.fsencode(self.mount), b"fuse", 0, options.encode()):
            raise OSError(ctypes.get_errno(), "mount of the FUSE file failed", str(self.mount))
        server = threading.Thread(target=self._serve, name="faultyfs", daemon=True)
        server.start()
        try:
            yield self.mount / self.real.name
        finally:
            subprocess.run(["umount", "--lazy", str(self.mount)], check=True)
            server.join(10)  # the connection ends with the last mount of it
            os.close(self._dev)
            os.close(self._fd)
