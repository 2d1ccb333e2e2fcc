"""Hostile input: only StreamError may escape, memory stays bounded."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.stream import RamBlock, StreamDecoder, StreamError
from vmsnap.stream import encoder as E
from vmsnap.stream.events import MappedRamHeader

from ._streams import PS, decode_all, small_stream

SMALL = small_stream(flush=True, switchover=True)
BE64 = struct.Struct(">Q")


def _device_start(data: bytes) -> int:
    """Offset of the first device-state byte (after the RAM END footer)."""
    dec = StreamDecoder()
    dec.feed(data)
    for e in dec.events():
        if type(e).__name__ == "RamEnd":
            return dec.offset
    raise AssertionError("no RamEnd")


def _run(data: bytes, chunks=None, **kw):
    dec = StreamDecoder(**kw)
    cuts = [0, *(chunks or []), len(data)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        dec.feed(data[a:b])
        list(dec.events())
    return dec.close()


def test_every_prefix_is_rejected_or_waits():
    dev = _device_start(SMALL)
    for n in range(len(SMALL)):
        prefix = SMALL[:n]
        dec = StreamDecoder()
        dec.feed(prefix)
        list(dec.events())  # must wait, not raise
        try:
            dec.close()
        except StreamError:
            continue
        # the only acceptable "complete" prefixes end with the EOF byte in device state
        assert n > dev and prefix[-1] == 0, n


def test_every_prefix_split_feed():
    for n in range(0, len(SMALL), 7):
        for cut in (1, n // 2, max(0, n - 1)):
            try:
                _run(SMALL[:n], [min(cut, n)])
            except StreamError:
                pass


@pytest.mark.qemu
def test_real_stream_prefixes(stream10):
    dev = _device_start(stream10)
    rng = np.random.default_rng(0)
    cuts = set(range(0, 400)) | set(rng.integers(0, len(stream10), 300).tolist())
    for n in sorted(cuts):
        try:
            _run(stream10[:n], [n // 3])
        except StreamError:
            continue
        assert n > dev and stream10[n - 1] == 0


@settings(max_examples=400)
@given(st.integers(0, len(SMALL) * 8 - 1), st.integers(1, 3000))
def test_bit_flips(bit, chunk):
    data = bytearray(SMALL)
    data[bit // 8] ^= 1 << (bit % 8)
    try:
        decode_all(bytes(data), chunk)
    except StreamError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.booleans())
def test_random_bytes(blob, with_header):
    data = (E.header() + blob) if with_header else blob
    try:
        decode_all(data, 97)
    except StreamError:
        pass


@settings(max_examples=200)
@given(st.integers(0, len(SMALL) - 1), st.binary(min_size=1, max_size=16))
def test_overwrites(pos, junk):
    data = bytearray(SMALL)
    data[pos : pos + len(junk)] = junk
    try:
        decode_all(bytes(data), 1000)
    except StreamError:
        pass


PC_RAM16 = (RamBlock("pc.ram", 16 * PS),)


def _prefix(blocks=PC_RAM16, caps=()):
    return E.header() + E.configuration("pc-q35-7.2", caps) + E.ram_start(3, blocks)


RAMHDR = E.header() + E.configuration("pc-q35-7.2") + E.section_start(3, "ram", 0, 4)


def _err(data: bytes, **kw) -> StreamError:
    with pytest.raises(StreamError) as ei:
        decode_all(data, **kw)
    return ei.value


@pytest.mark.parametrize(
    "data, field",
    [
        (b"QEVX" + b"\0\0\0\3", "magic"),
        (b"QEVM\0\0\0\2", "version"),
        (E.header() + b"\x07\xff\xff\xff\xff", "configuration.len"),
        (E.header() + E.configuration("m") + E.command(12), "command.cmd"),
        (E.header() + E.configuration("m") + E.command(2, b"\0"), "command.len"),
        (E.header() + E.configuration("m") + E.command(3, b"\0" * 8), "command.len"),
        (E.header() + E.configuration("m") + E.command(11, b"x"), "command.len"),
        (RAMHDR + BE64.pack(8 * PS | 4) + b"\x06pc.ram" + BE64.pack(16 * PS),
         "ramblock.used_length"),
        (_prefix() + BE64.pack(0x28) + bytes(PS), "ram.flags"),  # CONTINUE w/o block
        (_prefix() + BE64.pack(0x08) + b"\x03foo" + bytes(PS), "ram.idstr"),
        (_prefix() + BE64.pack(16 * PS | 0x08) + b"\x06pc.ram" + bytes(PS), "ram.offset"),
        (_prefix() + BE64.pack(0x02) + b"\x06pc.ram\0" + BE64.pack(99 * PS | 0x22) + b"\0",
         "ram.offset"),
        (_prefix() + BE64.pack(0x40) + b"\x06pc.ram", "ram.flags"),  # XBZRLE
        (_prefix() + BE64.pack(0x100), "ram.flags"),  # COMPRESS_PAGE
        (_prefix() + BE64.pack(0x80), "ram.flags"),  # HOOK
        (_prefix() + BE64.pack(0x01), "ram.flags"),
        (_prefix() + BE64.pack(0x04), "ram.flags"),  # second MEM_SIZE
        (_prefix() + E.eos() + E.footer(4), "section.footer.id"),
        (_prefix() + E.eos() + b"\x7f\0\0\0\3", "section.footer"),
        (_prefix() + E.eos() + E.footer(3) + E.section_part(9), "section.id"),
        (_prefix() + E.eos() + E.footer(3) + E.section_start(5, "block", 0, 1),
         "section.idstr"),
        (_prefix() + E.eos() + E.footer(3) + b"\x00", "record.type"),
        (E.header() + E.configuration("m") + b"\x09", "record.type"),
    ],
)
def test_specific_errors(data, field):
    e = _err(data)
    assert e.field == field, e
    assert isinstance(e, ValueError) and e.offset is not None


def test_error_names_section_and_offset():
    data = _prefix() + E.eos() + E.footer(3)
    e = _err(data + E.section_start(5, "dirty-bitmap", 0, 1))
    assert "dirty-bitmap" in str(e) and e.offset == len(data)
    e = _err(_prefix() + BE64.pack(0x40) + b"\x06pc.ram")
    assert "XBZRLE" in str(e) and e.offset == len(_prefix())


def test_page_offset_in_batch_reports_record_offset():
    p = _prefix()
    recs = E.page_records("pc.ram", np.array([0, PS, 2 * PS], np.uint64), bytes(3 * PS))
    bad = BE64.pack(16 * PS | 0x28) + bytes(PS)
    e = _err(p + recs + bad)
    assert e.field == "ram.offset" and e.offset == len(p) + len(recs)


def test_prelude_kept_verbatim():
    pre = E.section_start(7, "virtio-mem-early", 0, 1) + b"\x01\x02" + E.footer(7)
    body = small_stream()
    hdr_len = len(E.header() + E.configuration("pc-q35-7.2"))
    data = body[:hdr_len] + pre + body[hdr_len:]
    evs = decode_all(data, 5)
    prel = b"".join(e.data for e in evs if type(e).__name__ == "Prelude")
    assert prel == pre


def test_data_after_end_rejected():
    dec = StreamDecoder()
    dec.feed(SMALL)
    list(dec.events())
    with pytest.raises(StreamError):
        dec.feed(b"x")


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except StreamError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_memory_bounded_huge_lengths():
    huge_total = RAMHDR + BE64.pack((1 << 62) | 4) + b"\x06pc.ram" + BE64.pack(1 << 62)
    # a giant block is accepted, but nothing is allocated for it
    assert _peak(lambda: decode_all(huge_total + BE64.pack((1 << 40) | 8) + b"\x06pc.ram"
                                    + bytes(PS))) < 2 << 20
    # huge vmdesc length: bounded tail
    head = small_stream(vmdesc=False) + b"\x06" + struct.pack(">I", 0xFFFFFFF0) + b"{"

    def stream_no_nul():  # 32 MiB of device state without NUL, events discarded
        dec = StreamDecoder(max_vmdesc=1 << 20)
        dec.feed(head)
        for _ in range(32):
            dec.feed(b"a" * (1 << 20))
            for _ev in dec.events():
                pass
        dec.close()

    assert _peak(stream_no_nul) < 10 << 20  # input is 32 MiB
    # mapped-ram with an enormous pages_offset: skipping allocates nothing
    caps = ("mapped-ram",)
    pre = E.header() + E.configuration("pc-q35-10.0", caps)
    start = E.section_start(1, "ram", 0, 4) + BE64.pack(16 * PS | 4) + b"\x06pc.ram" + \
        BE64.pack(16 * PS)
    boff = len(pre) + len(start) + 28
    mrh = struct.pack(">IQQQ", 1, PS, boff, 1 << 60)
    data = pre + start + mrh + bytes(1 << 20)
    assert _peak(lambda: decode_all(data, 1 << 16)) < 2 << 20
    e = _err(data)
    assert e.field == "skip"
    # command with a big length and no payload: waits, then truncated
    assert _err(E.header() + E.configuration("m") + b"\x08\x00\x06\xff\xff").field == "top"


def test_mapped_ram_header_validation():
    pre = E.header() + E.configuration("pc-q35-10.0", ["mapped-ram"])
    start = E.section_start(1, "ram", 0, 4) + BE64.pack(16 * PS | 4) + b"\x06pc.ram" + \
        BE64.pack(16 * PS)
    boff = len(pre) + len(start) + 28
    for hdr, field in [
        (struct.pack(">IQQQ", 2, PS, boff, 1 << 20), "mapped_ram.version"),
        (struct.pack(">IQQQ", 1, 8192, boff, 1 << 20), "mapped_ram.page_size"),
        (struct.pack(">IQQQ", 1, PS, 5, 1 << 20), "mapped_ram.bitmap_offset"),
        (struct.pack(">IQQQ", 1, PS, boff, boff + 1), "mapped_ram.pages_offset"),
        (struct.pack(">IQQQ", 1, PS, boff, (1 << 20) + 1), "mapped_ram.pages_offset"),
    ]:
        assert _err(pre + start + hdr).field == field
    # used_length must be a page multiple (the bitmap has one bit per page)
    odd = E.section_start(1, "ram", 0, 4) + BE64.pack(16 * PS | 4) + b"\x06pc.ram" + \
        BE64.pack(16 * PS - 8)
    e = _err(pre + odd + struct.pack(">IQQQ", 1, PS, boff, 1 << 20))
    assert e.field == "ramblock.used_length" and e.offset == len(pre + odd) - 8


def test_mapped_ram_header_codec():
    h = MappedRamHeader(1, PS, 0x8B, 0x100000)
    raw = h.pack()
    assert len(raw) == MappedRamHeader.SIZE == 28 and raw == struct.pack(">IQQQ", *vars(h).values())
    assert MappedRamHeader.parse(b"xx" + raw, 2) == h
    h.check(1 << 28, 0x6F, PS)
    for bad, field, at in [
        (MappedRamHeader(2, PS, 0x8B, 0x100000), "mapped_ram.version", 0x6F),
        (MappedRamHeader(1, 8192, 0x8B, 0x100000), "mapped_ram.page_size", 0x6F + 4),
        (MappedRamHeader(1, PS, 0x10, 0x100000), "mapped_ram.bitmap_offset", 0x6F + 12),
        (MappedRamHeader(1, PS, 0xFFF00, 0x100000), "mapped_ram.pages_offset", 0x6F + 20),
        (MappedRamHeader(1, PS, 0x8B, 0x100001), "mapped_ram.pages_offset", 0x6F + 20),
    ]:
        with pytest.raises(StreamError) as ei:
            bad.check(1 << 28, 0x6F, PS)
        assert (ei.value.field, ei.value.offset) == (field, at)
    ignored = MappedRamHeader(1, PS, 0, 0)
    assert ignored.ignored
    ignored.check(1 << 28, 0x6F, PS)
    assert RamBlock("x", PS, mapped_ram=ignored).resume_offset is None
    with pytest.raises(StreamError, match="28 bytes"):
        MappedRamHeader.parse(raw[:27])


@given(st.binary(max_size=40), st.integers(0, 1 << 40), st.integers(0, 1 << 34))
@settings(max_examples=300)
def test_mapped_ram_header_random(data, hoff, used):
    try:
        MappedRamHeader.parse(data).check(used, hoff, PS)
    except StreamError:
        pass


def test_mapped_ram_entry_offsets_with_addr():
    """x-ignore-shared adds a be64 addr before the header: offsets still right."""
    caps = ("mapped-ram", "x-ignore-shared")
    pre = E.header() + E.configuration("pc-q35-10.0", caps) + E.section_start(1, "ram", 0, 4)
    blk = RamBlock("pc.ram", 16 * PS, addr=0x1234)
    pre += E.mem_size([blk])
    boff = len(pre) + blk.entry_size + 28
    blk = RamBlock("pc.ram", 16 * PS, addr=0x1234,
                   mapped_ram=MappedRamHeader(1, PS, boff, 1 << 20))
    assert blk.entry_size == 1 + 6 + 8 + 8 + 28
    dec = StreamDecoder()
    dec.feed(pre + E.ramblock_entry(blk, mapped_ram=True))
    got = next(e for e in dec.events() if type(e).__name__ == "RamBlocks").blocks[0]
    assert got == blk and got.stream_offset == len(pre)
    assert got.header_offset == len(pre) + 1 + 6 + 8 + 8
    assert dec.wanted_offset == (1 << 20) + 16 * PS
