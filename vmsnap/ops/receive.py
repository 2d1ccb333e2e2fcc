"""receive: turn a QEMU migration stream (one channel) into a snapshot file.

Pages go to their fixed place in the file as they arrive; a page sent again overwrites its
slot, a page later sent as zero clears its bit, so the file never outgrows RAM + metadata.
Everything after the RAM END section (device state, EOF, vmdesc) is kept verbatim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np

from ..errors import VmsnapError
from ..fileformat.writer import SnapshotWriter
from ..io.records import PageRecordReader
from ..io.vectored import widen_pipe
from ..stream import StreamDecoder, encoder
from ..stream import events as ev
from ..stream.constants import CAP_IGNORE_SHARED as IGNORE_SHARED
from ..stream.constants import CAP_MAPPED_RAM, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_POSTCOPY_ADVISE
from ..stream.decoder import leading_pages
from ..stream.postcopy import rp_shut
from .shared_ram import Backing, CopyStats, copy_left_out

CHUNK = 8 << 20
#: Decoder reads while page records may also be read straight into place: short, so that
#: the page records after a few other ones go the direct way (PageRecordReader) soon.
CHUNK_BESIDE_DIRECT = 256 << 10
#: Device state is small (KiB to a few MiB); refuse to buffer absurd amounts.
MAX_DEVICE_STATE = 1 << 30

log = logging.getLogger(__name__)


class Readable(Protocol):
    """A stream source: a binary file, pipe, or socket wrapper (readinto like RawIOBase)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


@dataclass
class ReceiveStats:
    path: str
    stream_bytes: int
    pages: int
    zero_pages: int
    blocks: int
    machine_type: str
    direct: bool


class StreamReceiver:
    """Feeds decoded events of one main channel into a SnapshotWriter."""

    def __init__(self, writer: SnapshotWriter, *, ignore_shared: bool = False):
        self.writer = writer
        #: x-ignore-shared stream: blocks carry their addr, shared ones no pages
        self.ignore_shared = ignore_shared
        self.streamed: set[str] = set()  # blocks with pages or zero records in the stream
        self.decoder = StreamDecoder()
        self.config: ev.Configuration | None = None
        self.prelude = b""
        self.section: ev.SectionStart | None = None
        self.device_state: list[bytes] = []
        self.device_bytes = 0
        self.return_path = False
        self.pages = 0
        self.zero_pages = 0
        self.blocks = 0
        self.ended: ev.StreamEnd | None = None

    def read_pages(self, reader: PageRecordReader) -> tuple[int, int]:
        """While the stream is in a run of plain page records, read them with `reader`
        straight into the writer's aligned buffers (no copy before the O_DIRECT write), up
        to the first other record, which goes to the decoder. Returns (records taken, stream
        bytes read): (0, 0) if the stream is not in such a run (use `feed_from`) or at end
        of input. Records the decoder had read already are taken without reading."""
        run = self.decoder.page_run(reader.capacity)
        if run is None:
            return 0, 0
        blk, prefix = run
        ps = self.writer.page_size
        buf = self.writer.page_buffer()
        try:
            count, rest = reader.read(buf, prefix, partial(
                leading_pages, used_length=blk.used_length, page_size=ps))
        except BaseException:
            self.writer.write_buffer(blk.name, (), buf)
            raise
        offsets = reader.headers[:count] & np.uint64(~(ps - 1) & 0xFFFFFFFFFFFFFFFF)
        self.writer.write_buffer(blk.name, offsets, buf, reader.sums[:count])
        self.pages += count
        self.streamed.add(blk.name)
        self.decoder.resume(count * (ps + 8), rest)
        for event in self.decoder.events():
            self._apply(event)
        return count, count * (ps + 8) + len(rest) - len(prefix)

    def feed_from(self, source: Readable, size: int = CHUNK) -> int:
        """Read up to `size` bytes from `source` into the decoder and apply what they hold."""
        n = self.decoder.feed_from(source.readinto, size)
        for event in self.decoder.events():
            self._apply(event)
        return n

    @property
    def machine_type(self) -> str:
        """The source's machine type (from the stream's configuration section)."""
        if self.config is None:
            raise VmsnapError("stream has no configuration section")
        return self.config.machine_type

    def close(self) -> None:
        for event in self.decoder.close():
            self._apply(event)
        if self.ended is None:
            raise VmsnapError("stream ended before QEMU's end-of-stream marker")

    def _apply(self, e: ev.Event) -> None:  # noqa: C901 - one branch per event type
        if isinstance(e, ev.Pages):
            self.writer.write_pages(e.block, e.offsets, e.data)
            self.pages += len(e.offsets)
            self.streamed.add(e.block)
        elif isinstance(e, ev.ZeroPages):
            self._zero(e)
            self.streamed.add(e.block)
        elif isinstance(e, ev.DeviceState):
            self.device_bytes += len(e.data)
            if self.device_bytes > MAX_DEVICE_STATE:
                raise VmsnapError("device state larger than 1 GiB: refusing")
            self.device_state.append(e.data)
        elif isinstance(e, ev.Configuration):
            if CAP_MAPPED_RAM in e.capabilities:
                raise VmsnapError("stream is already mapped-ram: use the file QEMU wrote")
            self.config = e
            log.debug("stream: machine %s, capabilities %s", e.machine_type, e.capabilities)
        elif isinstance(e, ev.Command):
            if e.cmd == MIG_CMD_OPEN_RETURN_PATH:
                self.return_path = True
            elif e.cmd == MIG_CMD_POSTCOPY_ADVISE:
                raise VmsnapError("postcopy streams are not supported: disable postcopy-ram")
        elif isinstance(e, ev.Prelude):
            self.prelude += e.data
        elif isinstance(e, ev.SectionStart):
            self.section = e
        elif isinstance(e, ev.RamBlocks):
            self._begin(e.blocks)
        elif isinstance(e, ev.StreamEnd):
            if e.vmdesc is None:
                raise VmsnapError("stream ended without QEMU's vmdesc trailer: incomplete")
            self.ended = e

    def _zero(self, e: ev.ZeroPages) -> None:
        if e.fill == 0:
            self.writer.zero_pages(e.block, e.offsets)
        else:  # QEMU <= 8.1 semantics: the page is filled with the byte
            page = self.writer.page_size
            data = np.full(len(e.offsets) * page, e.fill, dtype=np.uint8)
            self.writer.write_pages(e.block, e.offsets, data)
        self.zero_pages += len(e.offsets)

    def _begin(self, blocks: tuple[ev.RamBlock, ...]) -> None:
        if self.config is None or self.section is None:
            raise VmsnapError("stream lists RAM blocks before its configuration section")
        if any((b.addr is not None and not self.ignore_shared) or b.page_size is not None
               for b in blocks):
            raise VmsnapError("x-ignore-shared and hugepage RAM blocks are not supported")
        c = self.config
        # the file is the same whichever way RAM came: no x-ignore-shared, no addr
        caps = tuple(x for x in c.capabilities if x != IGNORE_SHARED)
        prefix = (encoder.header()
                  + encoder.configuration(c.machine_type, (*caps, CAP_MAPPED_RAM),
                                          page_bits=c.page_bits, uuid=c.uuid)
                  + self.prelude
                  + encoder.section_start(self.section.section_id, "ram",
                                          self.section.instance_id, self.section.version_id)
                  + encoder.mem_size(blocks))
        self.writer.begin(prefix, [(b.name, b.used_length) for b in blocks])
        log.debug("RAM blocks: %s", ", ".join(f"{b.name} {b.used_length:#x}" for b in blocks))
        self.blocks = len(blocks)

    def tail(self) -> bytes:
        """Stream bytes after the page areas: close START, an empty END, device state."""
        if self.section is None:
            raise VmsnapError("stream has no RAM section")
        sid = self.section.section_id
        return (encoder.eos() + encoder.footer(sid) + encoder.section_end(sid) + encoder.eos()
                + encoder.footer(sid) + b"".join(self.device_state))


def receive(source: Readable, writer: SnapshotWriter, *,
            progress: Callable[[int], None] | None = None,
            reply: Callable[[bytes], None] | None = None,
            before_commit: Callable[[], None] | None = None,
            shared: Mapping[str, Backing] | None = None) -> ReceiveStats:
    """Read a migration stream from `source` until its end and commit it through `writer`.

    On any failure FILE.partial is removed and an existing FILE is left untouched.
    `reply` sends bytes back to the source (a socket's return path), if there is one.
    `before_commit` runs once the stream is complete; raising there aborts the file.
    `shared`: the stream is an x-ignore-shared one; the blocks it leaves out are copied
    from these backings before the commit (the source must stay paused until then).
    """
    widen_pipe(source)
    reader = PageRecordReader.of(source, writer.page_size, writer.buffer_pages)
    with writer, ExitStack() as cleanup:
        if reader is not None:
            cleanup.callback(reader.close)
        rx = StreamReceiver(writer, ignore_shared=shared is not None)
        rx.decoder.direct_pages = reader is not None
        total = 0
        while rx.ended is None:
            taken, n = rx.read_pages(reader) if reader is not None else (0, 0)
            if not (taken or n):
                n = rx.feed_from(source, CHUNK if reader is None else CHUNK_BESIDE_DIRECT)
                if not n:
                    break
            total += n
            if progress:
                progress(total)
        rx.close()
        copied = CopyStats()
        if shared is not None:
            copied = copy_left_out(writer, rx.streamed, shared)
        if writer.metadata.machine_type is None:
            writer.metadata.machine_type = rx.machine_type
        if before_commit is not None:
            before_commit()
        writer.finish(rx.tail())
        if rx.return_path and reply is not None:
            log.debug("return path: SHUT(0) to the source")
            reply(rp_shut(0))
    return ReceiveStats(writer.path, total, rx.pages + copied.pages,
                        rx.zero_pages + copied.zero_pages, rx.blocks,
                        rx.machine_type, writer.direct)
