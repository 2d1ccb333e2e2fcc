"""send: turn a snapshot file back into a plain migration stream for `-incoming`.

Every present page is read once (O_DIRECT, read-ahead) and checked against the trailer
before it is sent; a mismatch stops the stream before its end, so the destination fails
its load instead of running with bad RAM. Zero pages go as cheap ZERO records, except in
blocks the caller knows the destination backs with fresh anonymous memory (zero already;
`restore` asks QEMU); small blocks (firmware, ROMs), which a destination fills itself at
startup, always get them, so every block ends up exactly as saved.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import VmsnapError
from ..fileformat.reader import Snapshot
from ..io.vectored import widen_pipe, writev_all
from ..stream import StreamDecoder, encoder
from ..stream import events as ev
from ..stream.constants import CAP_IGNORE_SHARED as IGNORE_SHARED
from ..stream.constants import CAP_MAPPED_RAM

#: Blocks at most this large are treated as firmware/ROM: absent pages are sent as ZERO.
EXPLICIT_ZERO_MAX = 64 << 20


@dataclass
class SendStats:
    stream_bytes: int
    pages: int
    zero_records: int


@dataclass
class StreamHead:
    """What the file's sequential stream says before the first block's page area."""

    config: ev.Configuration
    section: ev.SectionStart
    prelude: bytes


def read_head(snap: Snapshot) -> StreamHead:
    """Decode the header bytes of a snapshot file with the stream codec."""
    dec = StreamDecoder()
    dec.feed(snap.header_bytes)
    config = section = None
    prelude = b""
    for e in dec.events():
        if isinstance(e, ev.Configuration):
            config = e
        elif isinstance(e, ev.Prelude):
            prelude += e.data
        elif isinstance(e, ev.SectionStart):
            section = e
    if config is None or section is None:
        raise VmsnapError(f"{snap.path}: stream header incomplete")
    return StreamHead(config, section, prelude)


def plain_stream_head(snap: Snapshot, head: StreamHead, before_eos: bytes = b"",
                      shared: Mapping[str, int] | None = None, commands: bytes = b"") -> bytes:
    """Header, configuration without mapped-ram, and the RAM START with its block list
    (`commands`, e.g. postcopy's, go right after the configuration; `before_eos`, e.g. a
    multifd flush, right before the START's EOS). `shared`: an x-ignore-shared stream;
    block name -> addr of the blocks the destination ignores."""
    c = head.config
    caps = tuple(x for x in c.capabilities if x not in (CAP_MAPPED_RAM, IGNORE_SHARED))
    if shared is None:
        blocks = [ev.RamBlock(b.name, b.used_length) for b in snap.blocks]
    else:
        caps += (IGNORE_SHARED,)
        blocks = [ev.RamBlock(b.name, b.used_length, addr=shared.get(b.name, 0))
                  for b in snap.blocks]
    sid = head.section.section_id
    return (encoder.header()
            + encoder.configuration(c.machine_type, caps, page_bits=c.page_bits, uuid=c.uuid)
            + commands + head.prelude
            + encoder.ram_start(sid, blocks)
            + before_eos + encoder.eos() + encoder.footer(sid))


def explicit_zero_records(snap: Snapshot, last_block: str | None,
                          skip: Container[str] = (), fresh: Collection[str] = ()
                          ) -> tuple[bytes, int, str | None]:
    """ZERO records for the absent (zero) pages of every block but the `fresh` ones, as
    (records, page count, last block named); none for the blocks in `skip`. Only a block
    the destination backs with fresh anonymous memory is known to be zero already; a file
    backend may hold old data, and firmware/ROM-sized blocks are filled by the destination
    itself at startup."""
    out = bytearray()
    count = 0
    for block in snap.blocks:
        if block.name in skip or (block.used_length > EXPLICIT_ZERO_MAX
                                  and block.name in fresh):
            continue
        absent = np.flatnonzero(~block.present).astype(np.uint64) * np.uint64(block.page_size)
        if len(absent):
            out += encoder.zero_records(block.name, absent, continue_=block.name == last_block)
            last_block = block.name
            count += len(absent)
    return bytes(out), count, last_block


def device_state(snap: Snapshot) -> bytes:
    """The stream after the RAM START section: END section, device state, EOF, vmdesc."""
    closing = encoder.eos()
    tail = snap.tail
    if not tail.startswith(closing):
        raise VmsnapError(f"{snap.path}: stream after the page areas does not start with EOS")
    sid_footer = tail[len(closing):len(closing) + 5]
    return tail[len(closing) + len(sid_footer):]


class Sink(Protocol):
    """Where `send` writes: a binary file object over a descriptor (pipe, socket, file)."""

    def fileno(self) -> int: ...

    def flush(self) -> None: ...


def send(snap: Snapshot, sink: Sink, *,
         progress: Callable[[int, int], None] | None = None,
         shared: Mapping[str, int] | None = None, skip: Collection[str] = (),
         fresh: Collection[str] = ()) -> SendStats:
    """Write the open snapshot `snap` to `sink` (anything with a file descriptor: pipe,
    socket, file) as a plain migration stream; page data goes out by writev, uncopied.
    `shared`: an x-ignore-shared stream without the pages of these blocks (name -> addr),
    which the caller has put into the destination's shared RAM itself. Blocks in `skip`
    are listed but get no pages (the destination maps them from the file). Zero pages are
    sent as ZERO records except in the `fresh` blocks (see `explicit_zero_records`)."""
    skip = {*(shared or {}), *skip}
    head = read_head(snap)
    snap.check_stream_ranges()
    sid = head.section.section_id
    sink.flush()
    fd = sink.fileno()
    widen_pipe(fd)
    sent = writev_all(fd, [plain_stream_head(snap, head, shared=shared),
                           encoder.section_part(sid)])
    total = sum(b.present_count * b.page_size for b in snap.blocks if b.name not in skip)
    done = pages = 0
    last_block = None
    for block, first, count, data in snap.iter_pages(skip=skip):
        offsets = (np.arange(first, first + count, dtype=np.uint64)
                   * np.uint64(block.page_size))
        parts = encoder.page_record_parts(block.name, offsets, data,
                                          continue_=block.name == last_block)
        last_block = block.name
        sent += writev_all(fd, parts)
        pages += count
        done += count * block.page_size
        if progress:
            progress(done, total)
    records, zeros, _ = explicit_zero_records(snap, last_block, skip, fresh)
    sent += writev_all(fd, [records + encoder.eos() + encoder.footer(sid)
                            + device_state(snap)])
    return SendStats(sent, pages, zeros)
