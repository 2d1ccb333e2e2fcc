"""Small synthetic streams for unit tests."""

from __future__ import annotations

import json

import numpy as np

from vmsnap.stream import RamBlock, StreamDecoder
from vmsnap.stream import encoder as E

PS = 4096
BLOCKS = (RamBlock("pc.ram", 64 * PS), RamBlock("pc.bios", 4 * PS))
VMDESC = json.dumps({"page_size": PS, "devices": [{"name": "x"}]}).encode()


def small_stream(*, sid: int = 2, caps=(), vmdesc: bool = True, flush: bool = False,
                 switchover: bool = False) -> bytes:
    rng = np.random.default_rng(7)
    out = E.header() + E.configuration("pc-q35-7.2", caps)
    out += E.ram_start(sid, BLOCKS) + E.eos() + E.footer(sid)
    out += E.section_part(sid)
    offs = np.array([0, 1, 2, 5], np.uint64) * np.uint64(PS)
    out += E.page_records("pc.ram", offs, rng.integers(0, 256, 4 * PS, dtype=np.uint8))
    out += E.zero_records("pc.ram", np.array([3, 4], np.uint64) * np.uint64(PS), 0, True)
    out += E.page_records("pc.bios", np.array([PS], np.uint64),
                          rng.integers(0, 256, PS, dtype=np.uint8))
    if flush:
        out += E.multifd_flush()
    out += E.eos() + E.footer(sid)
    if switchover:
        out += E.command(11)
    out += E.section_end(sid) + E.eos() + E.footer(sid)
    out += b"\x04\x00\x00\x00\x07\x05timer" + bytes(range(40)) + E.footer(7)
    out += E.eof()
    if vmdesc:
        out += E.vmdescription(VMDESC)
    return out


def decode_all(data: bytes, chunk: int | None = None, **kw) -> list:
    dec = StreamDecoder(**kw)
    evs = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])
        evs.extend(dec.events())
    evs.extend(dec.close())
    return evs
