"""libvirt save images in and out: `virsh save`/`managedsave` output (a file, or a FIFO that
libvirt writes while vmsnap reads) to a snapshot, and a snapshot to an image (a file, or a
FIFO that `virsh restore` / `virsh start` reads while vmsnap writes).

The codec is vmsnap.stream.saveimage; this module only moves bytes.
"""

from __future__ import annotations

import errno
import os
import select
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import VmsnapError
from ..fileformat.reader import Snapshot, open_snapshot
from ..fileformat.trailer import TrailerMetadata
from ..fileformat.writer import SnapshotWriter
from ..io.atomic import AtomicFile
from ..ops.receive import ReceiveStats, receive
from ..ops.send import SendStats, send
from ..stream.saveimage import (
    HEADER_SIZE,
    MAGIC,
    MAGIC_PARTIAL,
    encode_head,
    parse_data,
    parse_header,
)

#: How long libvirt may take between the end of QEMU's stream and its final header.
FINAL_HEADER_TIMEOUT = 120.0


@dataclass
class DomainImage:
    """What a libvirt save image says besides QEMU's stream."""

    xml: str
    cookie: str | None
    was_running: bool

    def metadata(self) -> TrailerMetadata:
        """Snapshot metadata carrying the domain (restore brings it back through libvirt)."""
        return TrailerMetadata(extra={
            "run_state": "running" if self.was_running else "paused",
            "libvirt": {"xml": self.xml, "cookie": self.cookie}})


def domain_of(meta: TrailerMetadata | None) -> DomainImage | None:
    """The libvirt domain a snapshot was made from, if any."""
    xml = meta.domain_xml if meta else None
    if meta is None or xml is None:
        return None
    cookie = meta.extra["libvirt"].get("cookie")
    return DomainImage(xml, cookie if isinstance(cookie, str) else None, meta.was_running)


class _ImageSource:
    """readinto() over a file or FIFO that first serves bytes already read and, for a FIFO
    libvirt is still writing, holds back the last 92 bytes it read: libvirt's final header
    follows QEMU's stream there, possibly from a second open of the FIFO."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        self.pending = bytearray()
        self.hold_back = False
        self.writer_gone = False  # the writer closed the FIFO: the held bytes were released

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)

    def read_exactly(self, n: int) -> bytes:
        """`n` bytes (fewer only at the end of input), before the stream starts."""
        out = bytearray()
        while len(out) < n and (chunk := os.read(self.fd, n - len(out))):
            out += chunk
        return bytes(out)

    def readinto(self, view: memoryview) -> int:
        keep = HEADER_SIZE if self.hold_back and not self.writer_gone else 0
        while True:
            if len(self.pending) > keep:
                n = min(len(view), len(self.pending) - keep)
                view[:n] = self.pending[:n]
                del self.pending[:n]
                return n
            if self.writer_gone:
                return 0
            data = os.read(self.fd, max(len(view), HEADER_SIZE))
            if not data:
                if not keep:
                    return 0
                self.writer_gone = True  # QEMU's stream ended (or was cut): release it all
                keep = 0
            self.pending += data

    def final_header(self, timeout: float = FINAL_HEADER_TIMEOUT) -> bytes:
        """The 92 bytes libvirt writes after the stream, from this open of the FIFO or,
        once its first writer closed, from libvirt's reopen of it."""
        if self.writer_gone:
            self.pending.clear()
            self._reopen()
        while len(self.pending) < HEADER_SIZE:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            data = os.read(self.fd, HEADER_SIZE - len(self.pending)) if ready else b""
            if not data:
                raise VmsnapError(f"{self.path}: libvirt did not finish its save image "
                                  "(no final header after QEMU's stream)")
            self.pending += data
        return bytes(self.pending[:HEADER_SIZE])

    def _reopen(self) -> None:
        """Open the FIFO again before closing it, so a header libvirt writes meanwhile stays
        in the pipe; the new descriptor waits for the next writer."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.close(self.fd)
        self.fd = fd
        os.set_blocking(fd, True)


def import_stream(source: str, writer_path: str, *, progress: Callable[[int], None] | None = None,
                  direct: bool = True, final_header_timeout: float = FINAL_HEADER_TIMEOUT
                  ) -> tuple[ReceiveStats, DomainImage | None]:
    """Import `source` (a plain QEMU stream or a libvirt save image, a file or a FIFO) into
    the snapshot `writer_path`. Returns the receive figures and the domain, if any."""
    src = _ImageSource(source, os.open(source, os.O_RDONLY | os.O_CLOEXEC))
    try:
        if stat.S_ISDIR(os.fstat(src.fd).st_mode):  # its read would fail naming no path
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), source)
        head = src.read_exactly(HEADER_SIZE)
        domain = None
        if head[:16] not in (MAGIC, MAGIC_PARTIAL):
            src.pending[:0] = head  # a plain stream: its first bytes go to the decoder
            return receive(src, SnapshotWriter(writer_path, TrailerMetadata(), direct=direct),
                           progress=progress), None
        header = parse_header(head)
        if not header.complete and not stat.S_ISFIFO(os.fstat(src.fd).st_mode):
            raise VmsnapError(f"{source}: libvirt save image is incomplete "
                              "(libvirt did not finish writing it)")
        xml, cookie = parse_data(header, src.read_exactly(header.data_len))
        domain = DomainImage(xml, cookie, header.was_running)
        src.hold_back = not header.complete

        def check_final() -> None:
            if src.final_header(final_header_timeout) != header.completed().encode():
                raise VmsnapError(f"{source}: libvirt's final header does not match its first")

        stats = receive(src, SnapshotWriter(writer_path, domain.metadata(), direct=direct),
                        progress=progress, before_commit=check_final if src.hold_back else None)
    finally:
        src.close()
    return stats, domain


def image_head(snap: Snapshot, *, xml: str | None = None,
               was_running: bool | None = None) -> bytes:
    """libvirt's header + XML for the open snapshot `snap`: its stored domain XML unless
    `xml` is given."""
    domain = domain_of(snap.metadata)
    if xml is None:
        if domain is None:
            raise VmsnapError(f"{snap.path} was not saved from a libvirt domain: give the "
                              "domain's XML (virsh dumpxml --migratable DOMAIN)")
        xml = domain.xml
    if was_running is None:
        was_running = domain.was_running if domain else True
    return encode_head(xml, was_running=was_running,
                       cookie=domain.cookie if domain and xml == domain.xml else None)


def export_image(snapshot: str, dest: str, *, xml: str | None = None,
                 was_running: bool | None = None, direct: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> SendStats:
    """Write `snapshot` as a libvirt save image to `dest`: a FIFO (written as read, for
    `virsh restore FIFO`) or a file (replaced atomically). The domain XML comes from the
    snapshot's metadata unless `xml` is given."""
    with open_snapshot(snapshot, direct=direct) as snap:
        head = image_head(snap, xml=xml, was_running=was_running)
        if os.path.exists(dest) and stat.S_ISFIFO(os.stat(dest).st_mode):
            fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
            try:
                return write_image(fd, head, snap, progress)
            finally:
                os.close(fd)
        with AtomicFile(dest) as af:
            stats = write_image(af.fd, head, snap, progress)
            af.commit()
    return stats


def write_image(fd: int, head: bytes, snap: Snapshot,
                progress: Callable[[int, int], None] | None = None) -> SendStats:
    """`head` then the open snapshot `snap` as a plain migration stream, to `fd`."""
    with open(fd, "wb", closefd=False) as sink:
        sink.write(head)
        stats = send(snap, sink, progress=progress)
    stats.stream_bytes += len(head)
    return stats
