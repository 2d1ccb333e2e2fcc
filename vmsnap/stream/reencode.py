"""Turn decoder events back into stream bytes (used for round trips and rewriting)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from . import encoder as E
from .constants import CAP_MAPPED_RAM, TARGET_PAGE_SIZE
from .events import (
    Command,
    Configuration,
    DeviceState,
    Event,
    Header,
    MultifdFlush,
    Pages,
    Prelude,
    RamBlocks,
    RamEnd,
    RamEos,
    SectionEnd,
    SectionPart,
    SectionStart,
    StreamEnd,
    ZeroPages,
)


class EventEncoder:
    """Stateful events → bytes. For mapped-ram streams the block list is emitted with
    its headers back to back (no jumps); files use ``vmsnap.fileformat.layout``."""

    def __init__(self, page_size: int = TARGET_PAGE_SIZE) -> None:
        self.page_size = page_size
        self.sid: int | None = None
        self.mapped_ram = False

    def encode(self, ev: Event) -> bytes:
        ps = self.page_size
        if isinstance(ev, Pages):
            return E.page_records(ev.block, ev.offsets, ev.data, ev.continued, ps)
        if isinstance(ev, ZeroPages):
            return E.zero_records(ev.block, ev.offsets, ev.fill, ev.continued, ps)
        if isinstance(ev, DeviceState | Prelude):
            return bytes(ev.data)
        if isinstance(ev, Header):
            return E.header(ev.version)
        if isinstance(ev, Configuration):
            self.mapped_ram = CAP_MAPPED_RAM in ev.capabilities
            return E.configuration(ev.machine_type, ev.capabilities, page_bits=ev.page_bits,
                                   uuid=ev.uuid)
        if isinstance(ev, Command):
            return E.command(ev.cmd, ev.payload)
        if isinstance(ev, SectionStart):
            self.sid = ev.section_id
            return E.section_start(ev.section_id, ev.idstr, ev.instance_id, ev.version_id)
        if isinstance(ev, RamBlocks):
            return E.mem_size(ev.blocks, ps) + b"".join(
                E.ramblock_entry(b, mapped_ram=self.mapped_ram) for b in ev.blocks)
        if isinstance(ev, SectionPart):
            return E.section_part(ev.section_id)
        if isinstance(ev, SectionEnd):
            return E.section_end(ev.section_id)
        if isinstance(ev, RamEos):
            if self.sid is None:
                raise ValueError("RamEos before SectionStart")
            return E.eos() + E.footer(self.sid)
        if isinstance(ev, MultifdFlush):
            return E.multifd_flush()
        if isinstance(ev, RamEnd | StreamEnd):
            return b""
        raise TypeError(f"not an event: {ev!r}")


def iter_encode(events: Iterable[Event], page_size: int = TARGET_PAGE_SIZE) -> Iterator[bytes]:
    enc = EventEncoder(page_size)
    for ev in events:
        b = enc.encode(ev)
        if b:
            yield b


def encode_events(events: Iterable[Event], page_size: int = TARGET_PAGE_SIZE) -> bytes:
    return b"".join(iter_encode(events, page_size))
