"""Multifd init packet and packet header parse/pack/validation (reference §3.2, §3.3)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.stream import StreamError
from vmsnap.stream.multifd import MultifdInit, PacketHeader, header_size, page_count

PS = 4096
BLOCKS = {"pc.ram": 1 << 27, "pc.bios": 1 << 18}


def test_sizes():
    assert header_size(PS) == 1344 and page_count(PS) == 128
    assert MultifdInit.SIZE == 64


def test_init_roundtrip_and_layout():
    i = MultifdInit(bytes(range(16)), 3)
    b = i.pack()
    assert len(b) == 64 and b[:4] == b"\x11\x22\x33\x44" and b[4:8] == b"\0\0\0\1"
    assert b[8:24] == bytes(range(16)) and b[24] == 3 and b[25:] == bytes(39)
    assert MultifdInit.parse(b) == i
    assert MultifdInit.parse(b"xx" + b, 2) == i
    with pytest.raises(StreamError, match="id"):
        MultifdInit.parse(b, channels=3)
    with pytest.raises(StreamError) as e:
        MultifdInit.parse(b"QEVM" + b[4:])
    assert e.value.field == "multifd.init.magic"
    with pytest.raises(StreamError):
        MultifdInit.parse(b[:63])


def test_header_layout():
    h = PacketHeader.make("pc.ram", np.array([0, PS], np.uint64), np.array([8 * PS], np.uint64),
                          packet_num=7, flags=1)
    b = h.pack()
    assert len(b) == 1344
    magic, ver, flags, alloc, normal, nps, num, zero = struct.unpack_from(">IIIIIIQI", b)
    assert (magic, ver, flags, alloc, normal, nps, num, zero) == (
        0x11223344, 1, 1, 128, 2, 2 * PS, 7, 1)
    assert b[64:70] == b"pc.ram" and b[70:320] == bytes(250)
    assert struct.unpack_from(">3Q", b, 320) == (0, PS, 8 * PS)
    p = PacketHeader.parse(b, blocks=BLOCKS)
    assert p == h and p.sync and p.block == "pc.ram"
    assert list(p.normal_offsets) == [0, PS] and list(p.zero_offsets) == [8 * PS]
    assert p.payload_size() == 2 * PS


def test_stale_fields_tolerated_72():
    """7.2: an empty packet keeps next_packet_size/ramblock/offset slots of the last one."""
    h = PacketHeader.make("pc.ram", np.arange(128, dtype=np.uint64) * np.uint64(PS))
    b = bytearray(h.pack())
    struct.pack_into(">I", b, 16, 0)  # normal_pages = 0, next_packet_size stale
    struct.pack_into(">I", b, 8, 1)  # SYNC
    struct.pack_into(">I", b, 64, 0x66666666)  # garbage ramblock, never checked
    p = PacketHeader.parse(bytes(b), blocks=BLOCKS, legacy=True)
    assert p.normal_pages == 0 and p.payload_size() == 0 and p.next_packet_size == 128 * PS
    assert bytes(p.pack()) == bytes(b)


def test_sync_92_pages_alloc_zero():
    h = PacketHeader(flags=1, pages_alloc=0, packet_num=9, next_packet_size=0)
    p = PacketHeader.parse(h.pack(), blocks=BLOCKS)
    assert p.pages_alloc == 0 and p.sync and p.payload_size() == 0


def test_legacy_ignores_word_at_32():
    h = PacketHeader.make("pc.ram", np.array([0], np.uint64))
    b = bytearray(h.pack())
    struct.pack_into(">I", b, 32, 0xFFFFFFFF)
    with pytest.raises(StreamError) as e:
        PacketHeader.parse(bytes(b))
    assert e.value.field == "multifd.zero_pages" and e.value.offset == 32
    assert PacketHeader.parse(bytes(b), legacy=True).zero_pages == 0


@pytest.mark.parametrize(
    "off, value, field",
    [
        (0, 0x5145564D, "multifd.magic"),
        (4, 2, "multifd.version"),
        (8, 0x2, "multifd.flags"),  # zlib
        (8, 0x40, "multifd.flags"),  # device state
        (8, 0x80, "multifd.flags"),
        (12, 129, "multifd.pages_alloc"),
        (16, 129, "multifd.normal_pages"),
        (32, 127, "multifd.zero_pages"),
        (64, 0x78787878, "multifd.ramblock"),
        (320, PS + 1, "multifd.offset"),
        (328, 1 << 27, "multifd.offset"),
    ],
)
def test_header_validation(off, value, field):
    h = PacketHeader.make("pc.ram", np.array([0, PS], np.uint64))
    b = bytearray(h.pack())
    if off >= 320:
        struct.pack_into(">Q", b, off, value)
    else:
        struct.pack_into(">I", b, off, value)
    with pytest.raises(StreamError) as e:
        PacketHeader.parse(bytes(b), blocks=BLOCKS)
    assert e.value.field == field


def test_truncated_header():
    with pytest.raises(StreamError):
        PacketHeader.parse(bytes(1343))


@settings(max_examples=300)
@given(st.binary(min_size=1344, max_size=1344), st.booleans())
def test_random_headers_only_stream_error(blob, legacy):
    b = struct.pack(">II", 0x11223344, 1) + blob[8:]
    try:
        p = PacketHeader.parse(b, blocks=BLOCKS, legacy=legacy)
    except StreamError:
        return
    assert p.normal_pages + p.zero_pages <= p.pages_alloc <= 128
    if not legacy:
        assert p.pack() == b


@settings(max_examples=100)
@given(st.lists(st.integers(0, (1 << 27) // PS - 1), max_size=128), st.integers(0, 128),
       st.integers(0, 2**64 - 1))
def test_header_roundtrip(pages, nzero, num):
    nzero = min(nzero, len(pages))
    offs = np.array(pages, np.uint64) * np.uint64(PS)
    h = PacketHeader.make("pc.ram", offs[nzero:], offs[:nzero], packet_num=num)
    p = PacketHeader.parse(h.pack(), blocks=BLOCKS)
    assert p == h
    assert list(p.zero_offsets) == list(offs[:nzero])
