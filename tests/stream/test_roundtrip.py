"""decode(encode(x)) == x for generated streams; encoder unit tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.fileformat.layout import compute_layout
from vmsnap.stream import (
    Command,
    Configuration,
    DeviceState,
    Header,
    MultifdFlush,
    Pages,
    RamBlock,
    RamBlocks,
    RamEnd,
    RamEos,
    SectionEnd,
    SectionPart,
    SectionStart,
    StreamEnd,
    ZeroPages,
    decoder,
    encode_events,
)
from vmsnap.stream import encoder as E
from vmsnap.stream.events import MappedRamHeader

from ._streams import PS, decode_all, small_stream


def normalize(evs):
    """Merge batches the decoder may split differently; reduce Configuration."""
    out = []
    for e in evs:
        if isinstance(e, Configuration):
            e = ("cfg", e.machine_type, e.capabilities)
        prev = out[-1] if out else None
        if isinstance(e, Pages) and isinstance(prev, Pages) and prev.block == e.block \
                and e.continued:
            out[-1] = Pages(prev.block, np.concatenate([prev.offsets, e.offsets]),
                            memoryview(bytes(prev.data) + bytes(e.data)), prev.continued)
            continue
        if isinstance(e, ZeroPages) and isinstance(prev, ZeroPages) and prev.block == e.block \
                and e.continued and prev.fill == e.fill:
            out[-1] = ZeroPages(prev.block, np.concatenate([prev.offsets, e.offsets]),
                                prev.fill, prev.continued)
            continue
        if isinstance(e, DeviceState) and isinstance(prev, DeviceState):
            out[-1] = DeviceState(prev.data + e.data)
            continue
        if isinstance(e, StreamEnd):
            e = StreamEnd(e.vmdesc)
        out.append(e)
    return out


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz./@-0123456789", min_size=1, max_size=40)


@st.composite
def scenarios(draw):
    nblocks = draw(st.integers(1, 4))
    bnames = draw(st.lists(names, min_size=nblocks, max_size=nblocks, unique=True))
    ignore_shared = draw(st.booleans())
    blocks = tuple(
        RamBlock(n, draw(st.integers(1, 16)) * PS, None,
                 draw(st.integers(0, 2**40)) if ignore_shared else None)
        for n in bnames
    )
    caps = ("x-ignore-shared",) if ignore_shared else ()
    sid = draw(st.integers(0, 2**32 - 1))
    evs = [Header(3), Configuration(draw(st.sampled_from(["pc-q35-7.2", "pc-q35-10.0"])),
                                    caps, b"")]
    if draw(st.booleans()):
        evs += [Command(1, b""), Command(2, b"\x00\x00\x00\x01")]
    evs += [SectionStart(sid, "ram", 0, 4), RamBlocks(blocks)]
    last = None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nsec = draw(st.integers(0, 3))
    for si in range(nsec + 2):
        if si == nsec + 1:
            if draw(st.booleans()):
                evs.append(Command(11, b""))
            evs.append(SectionEnd(sid))
        elif si > 0:
            evs.append(SectionPart(sid))
        for _ in range(draw(st.integers(0, 4)) if si else 0):
            kind = draw(st.sampled_from(["page", "zero", "flush"]))
            if kind == "flush":
                evs.append(MultifdFlush())
                continue
            b = draw(st.sampled_from(blocks))
            npg = b.used_length // PS
            offs = np.array(draw(st.lists(st.integers(0, npg - 1), min_size=1, max_size=6)),
                            np.uint64) * np.uint64(PS)
            cont = b.name == last and draw(st.booleans())
            if kind == "page":
                data = rng.integers(0, 256, len(offs) * PS, dtype=np.uint8)
                evs.append(Pages(b.name, offs, memoryview(data), cont))
            else:
                evs.append(ZeroPages(b.name, offs, draw(st.sampled_from([0, 0, 0xAB])), cont))
            last = b.name
        evs.append(RamEos("start" if si == 0 else "end" if si == nsec + 1 else "part"))
    evs.append(RamEnd())
    vm = json.dumps({"page_size": PS, "devices": []}).encode()
    dev = draw(st.binary(max_size=200)).replace(b"\x00", b"\x01")
    evs.append(DeviceState(b"\x04" + dev + b"\x00" + E.vmdescription(vm)))
    evs.append(StreamEnd(vm))
    return evs


@settings(max_examples=150)
@given(scenarios(), st.integers(1, 5000))
def test_roundtrip(evs, chunk):
    data = encode_events(evs)
    got = decode_all(data, chunk)
    assert normalize(got) == normalize(evs)
    assert encode_events(got) == data


def test_small_stream_roundtrip():
    for kw in ({}, {"flush": True, "switchover": True}, {"vmdesc": False}):
        data = small_stream(**kw)
        evs = decode_all(data)
        assert encode_events(evs) == data
        assert isinstance(evs[-1], StreamEnd)
        assert (evs[-1].vmdesc is None) == (kw.get("vmdesc") is False)


def test_zero_fill_exposed():
    data = (E.header() + E.configuration("pc-q35-7.2")
            + E.ram_start(1, [RamBlock("pc.ram", 4 * PS)]) + E.eos() + E.footer(1)
            + E.section_end(1)
            + E.zero_records("pc.ram", np.array([0, PS], np.uint64), fill=0xAB)
            + E.eos() + E.footer(1) + b"\x00")
    evs = decode_all(data)
    z = [e for e in evs if isinstance(e, ZeroPages)]
    assert len(z) == 1 and z[0].fill == 0xAB and list(z[0].offsets) == [0, PS]


def test_long_zero_run_in_one_buffer():
    """A zero run longer than the decoder looks ahead at once (_ZERO_SCAN) comes out as
    several ZeroPages events that hold every page once, in order; a page record after it
    still decodes."""
    n = 2 * decoder._ZERO_SCAN + 5
    offs = np.arange(n, dtype=np.uint64) * np.uint64(PS)
    page = np.full(PS, 7, np.uint8)
    data = (E.header() + E.configuration("pc-q35-7.2")
            + E.ram_start(1, [RamBlock("pc.ram", (n + 1) * PS)]) + E.eos() + E.footer(1)
            + E.section_end(1) + E.zero_records("pc.ram", offs, fill=0)
            + E.page_records("pc.ram", np.array([n * PS], np.uint64), page, continue_=True)
            + E.eos() + E.footer(1) + b"\x00")
    evs = decode_all(data)
    z = [e for e in evs if isinstance(e, ZeroPages)]
    assert len(z) == 3
    assert np.array_equal(np.concatenate([e.offsets for e in z]), offs)
    p = [e for e in evs if isinstance(e, Pages)]
    assert len(p) == 1 and list(p[0].offsets) == [n * PS] and bytes(p[0].data) == page.tobytes()


def test_page_records_layout():
    offs = np.array([0, PS, 3 * PS], np.uint64)
    pages = np.arange(3 * PS, dtype=np.uint32).astype(np.uint8)
    b = E.page_records("pc.ram", offs, pages)
    assert b[:8] == (0x08).to_bytes(8, "big")
    assert b[8:15] == b"\x06pc.ram"
    assert b[15 : 15 + PS] == pages[:PS].tobytes()
    assert b[15 + PS : 23 + PS] == (PS | 0x28).to_bytes(8, "big")
    assert len(b) == 7 + 3 * (8 + PS)
    c = E.page_records("pc.ram", offs, pages, continue_=True)
    assert len(c) == 3 * (8 + PS) and c[:8] == (0x28).to_bytes(8, "big")


@pytest.mark.parametrize("continue_", [False, True])
@pytest.mark.parametrize("count", [1, 3])
def test_packed_page_records_are_the_same_bytes(continue_, count):
    offs = np.array([0, PS, 3 * PS][:count], np.uint64) + np.uint64(5 * PS)
    pages = np.random.default_rng(count).integers(0, 256, count * PS, dtype=np.uint8)
    packed = E.page_records_packed("pc.ram", offs, pages, continue_)
    assert b"".join(bytes(p) for p in packed) == E.page_records("pc.ram", offs, pages, continue_)
    assert len(packed) == (1 if continue_ else 2)
    with pytest.raises(ValueError):
        E.page_records_packed("pc.ram", offs, pages[:-1])


def test_configuration_bytes_match_reference():
    # reference §1.3 (mapped-ram example)
    assert E.configuration("pc-q35-10.2", ["mapped-ram"]) == (
        b"\x07\x00\x00\x00\x0bpc-q35-10.2\x05\x1aconfiguration/capabilities"
        b"\x00\x00\x00\x01\x00\x00\x00\x01\x0amapped-ram")


def mapped_ram_file(blocks, sid=1):
    """A mapped-ram file laid out by vmsnap.fileformat (bitmaps/pages left zero)."""
    pre = E.header() + E.configuration("pc-q35-10.0", ["mapped-ram"]) + \
        E.section_start(sid, "ram", 0, 4) + E.mem_size([RamBlock(n, ln) for n, ln in blocks])
    lay = compute_layout(blocks, len(pre), PS)
    f = bytearray(lay.tail_offset)
    f[: len(pre)] = pre
    for b in lay.blocks:
        rec = b.record()
        f[b.idstr_offset : b.idstr_offset + len(rec)] = rec
    f += E.eos() + E.footer(sid) + E.section_end(sid) + E.eos() + E.footer(sid) + b"\x00"
    return bytes(f), lay


def test_mapped_ram_layout_roundtrip():
    blocks = [("pc.ram", 64 * PS), ("pc.bios", 16 * PS)]
    f, lay = mapped_ram_file(blocks)
    start = len(E.header() + E.configuration("pc-q35-10.0", ["mapped-ram"]))
    assert lay.blocks[0].pages_offset == 1 << 20
    assert lay.blocks[0].bitmap_offset == start + 5 + 4 + 8 + 8 + 7 + 8 + 28
    evs = decode_all(f, 65536)
    got = next(e for e in evs if isinstance(e, RamBlocks)).blocks
    assert list(got) == [b.ram_block for b in lay.blocks]
    # the decoder reports where each entry and its MappedRamHeader are
    assert [(b.stream_offset, b.header_offset, b.resume_offset) for b in got] == \
        [(b.idstr_offset, b.header_offset, b.end) for b in lay.blocks]
    assert isinstance(evs[-1], StreamEnd) and evs[-1].end_offset == len(f)
    assert MappedRamHeader.bitmap_size_for(65 * PS, PS) == 16
