"""Tiny stream-byte builders for the file-format tests, made with vmsnap.stream's encoder."""

from __future__ import annotations

import json

from vmsnap.stream import RamBlock
from vmsnap.stream import encoder as E


def prefix(machine: str, blocks: list[tuple[str, int]], sid: int = 1,
           caps: tuple[str, ...] = ("mapped-ram",)) -> bytes:
    """Header, configuration and the RAM START up to the first block idstr."""
    return (E.header() + E.configuration(machine, caps) + E.section_start(sid, "ram", 0, 4)
            + E.mem_size([RamBlock(n, ln) for n, ln in blocks]))


def tail(sid: int = 1, device_state: bytes = b"\x04fake-device-state",
         vmdesc: bool = True) -> bytes:
    """EOS + footer, RAM END section, device state, EOF [, vmdesc]."""
    out = E.eos() + E.footer(sid) + E.section_end(sid) + E.eos() + E.footer(sid)
    out += device_state + E.eof()
    if not vmdesc:
        return out
    return out + E.vmdescription(json.dumps({"page_size": 4096, "devices": []}).encode())
