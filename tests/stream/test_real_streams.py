"""Decode real QEMU 7.2 / 10 captures fully and re-encode them byte for byte."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from vmsnap.fileformat.layout import compute_layout
from vmsnap.stream import (
    Command,
    Configuration,
    DeviceState,
    Header,
    Pages,
    RamBlocks,
    RamEnd,
    RamEos,
    SectionEnd,
    SectionStart,
    StreamDecoder,
    StreamEnd,
    ZeroPages,
    encode_events,
)
from vmsnap.stream import encoder as E
from vmsnap.stream.events import MappedRamHeader

from ._streams import decode_all
from .conftest import MEM_MB

PS = 4096


@pytest.mark.qemu
@pytest.mark.parametrize("chunk", [None, 1 << 20, 4093, 9])
def test_decode_and_reencode(sequential_stream, chunk):
    name, data = sequential_stream
    evs = decode_all(data, chunk)
    assert isinstance(evs[0], Header) and evs[0].version == 3
    cfg = evs[1]
    assert isinstance(cfg, Configuration)
    if name in ("qemu72-q35", "qemu10-pc-q35-7.2"):
        assert cfg.machine_type == "pc-q35-7.2"
    else:
        assert cfg.machine_type.startswith("pc-q35-10.")
    assert cfg.capabilities == ()
    assert E.configuration(cfg.machine_type, cfg.capabilities) == cfg.raw
    start = next(e for e in evs if isinstance(e, SectionStart))
    assert (start.idstr, start.instance_id, start.version_id) == ("ram", 0, 4)
    blocks = next(e for e in evs if isinstance(e, RamBlocks)).blocks
    by_name = {b.name: b for b in blocks}
    assert by_name["pc.ram"].used_length == MEM_MB << 20
    # the first pass sends every page of every block exactly once (paused guest)
    seen = {b.name: np.zeros(b.used_length // PS, np.int64) for b in blocks}
    for e in evs:
        if isinstance(e, Pages | ZeroPages):
            np.add.at(seen[e.block], (e.offsets // PS).astype(np.int64), 1)
        if isinstance(e, Pages):
            assert len(e.data) == len(e.offsets) * PS
    for b, cnt in seen.items():
        assert (cnt == 1).all(), b
    # BIOS is non-trivial content
    bios = [e for e in evs if isinstance(e, Pages) and e.block == "pc.bios"]
    assert bios and any(bytes(e.data).strip(b"\0") for e in bios)
    kinds = [e.section_kind for e in evs if isinstance(e, RamEos)]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"part"}
    cmds = [e.cmd for e in evs if isinstance(e, Command)]
    if name == "qemu10-q35":
        assert cmds == [11]  # SWITCHOVER_START, machine >= 10.0
        i = next(i for i, e in enumerate(evs) if isinstance(e, Command))
        assert isinstance(evs[i + 1], SectionEnd)
    else:
        assert cmds == []
    iend = next(i for i, e in enumerate(evs) if isinstance(e, RamEnd))
    assert all(isinstance(e, DeviceState) for e in evs[iend + 1 : -1])
    end = evs[-1]
    assert isinstance(end, StreamEnd) and end.end_offset == len(data)
    js = json.loads(end.vmdesc)
    assert js["page_size"] == PS and js["devices"]
    dev = b"".join(e.data for e in evs[iend + 1 : -1])
    assert dev.endswith(b"\x00\x06" + struct.pack(">I", len(end.vmdesc)) + end.vmdesc)
    assert dev[0] == 0x04  # first FULL section
    assert encode_events(evs) == data


@pytest.mark.qemu
def test_device_state_boundary_is_ram_end_footer(stream72):
    dec = StreamDecoder()
    dec.feed(stream72)
    evs = list(dec.events())
    evs += dec.close()
    iend = next(i for i, e in enumerate(evs) if isinstance(e, RamEnd))
    dev = b"".join(e.data for e in evs[iend + 1 :] if isinstance(e, DeviceState))
    assert stream72.endswith(dev)
    ram_part = stream72[: len(stream72) - len(dev)]
    assert ram_part.endswith(E.section_end(2) + E.eos() + E.footer(2))  # 7.2: ram sid 2


def _mapped_ram_events(path, use_seek: bool):
    dec = StreamDecoder()
    evs = []
    with open(path, "rb") as f:
        while True:
            if use_seek and dec.wanted_offset > dec.fed_offset:
                dec.seek(dec.wanted_offset)
                f.seek(dec.wanted_offset)
            data = f.read(1 << 20)
            if not data:
                break
            dec.feed(data)
            evs.extend(dec.events())
    evs.extend(dec.close())
    return evs


@pytest.mark.qemu
@pytest.mark.parametrize("use_seek", [False, True])
def test_mapped_ram_file(mapped_ram_file, stream10, use_seek):
    evs = _mapped_ram_events(mapped_ram_file, use_seek)
    raw = mapped_ram_file.read_bytes()
    cfg = next(e for e in evs if isinstance(e, Configuration))
    assert cfg.capabilities == ("mapped-ram",)
    assert E.configuration(cfg.machine_type, ["mapped-ram"]) == cfg.raw
    start = next(e for e in evs if isinstance(e, SectionStart))
    blocks = next(e for e in evs if isinstance(e, RamBlocks)).blocks
    assert not any(isinstance(e, Pages | ZeroPages) for e in evs)
    # QEMU's layout rules (§5.2) reproduced by vmsnap.fileformat.layout; the decoder
    # reports where each entry is
    first = blocks[0].stream_offset
    assert raw[:first].endswith(E.section_start(start.section_id, "ram", 0, 4)
                                + E.mem_size(blocks))
    layout = compute_layout([(b.name, b.used_length) for b in blocks], first)
    assert [b.ram_block for b in layout.blocks] == list(blocks)
    for b, lb in zip(blocks, layout.blocks, strict=True):
        m = b.mapped_ram
        assert m.version == 1 and m.page_size == PS
        assert m.pages_offset % (1 << 20) == 0
        assert (b.stream_offset, b.header_offset) == (lb.idstr_offset, lb.header_offset)
        assert raw[lb.idstr_offset : lb.idstr_offset + len(lb.record())] == lb.record()
        assert MappedRamHeader.parse(raw, b.header_offset) == m
    tail = E.eos() + E.footer(start.section_id)
    last = blocks[-1].resume_offset
    assert raw[last : last + len(tail)] == tail
    assert evs[-1].end_offset == len(raw)
    # pages of pc.bios in the file == pages of pc.bios in the sequential QEMU 10 stream
    b = next(b for b in blocks if b.name == "pc.bios")
    m = b.mapped_ram
    bm = np.frombuffer(raw, "<u8", count=b.bitmap_size // 8, offset=m.bitmap_offset)
    bits = np.unpackbits(bm.view(np.uint8), bitorder="little")[: b.used_length // PS]
    file_pages = {
        i * PS: raw[m.pages_offset + i * PS : m.pages_offset + (i + 1) * PS]
        for i in np.flatnonzero(bits)
    }
    seq = {}
    for e in decode_all(stream10):
        if isinstance(e, Pages) and e.block == "pc.bios":
            for j, o in enumerate(e.offsets):
                seq[int(o)] = bytes(e.data[j * PS : (j + 1) * PS])
    assert file_pages == seq
