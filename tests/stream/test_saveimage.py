"""The libvirt save-image codec: round trip, and one clear error per kind of bad header."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsnap.stream.saveimage import (
    HEADER_SIZE,
    MAGIC_PARTIAL,
    SaveImageError,
    SaveImageHeader,
    encode_head,
    parse_data,
    parse_header,
)

XML = "<domain type='kvm'><name>g</name><uuid>0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0</uuid></domain>"


@given(xml=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                   min_size=1, max_size=300).filter(str.strip),
       cookie=st.none() | st.text(st.characters(blacklist_characters="\x00",
                                                blacklist_categories=("Cs",)),
                                  min_size=1, max_size=50),
       running=st.booleans(), complete=st.booleans())
def test_round_trip(xml, cookie, running, complete):
    head = encode_head(xml, was_running=running, cookie=cookie, complete=complete)
    h = parse_header(head)
    assert (h.complete, h.was_running) == (complete, running)
    assert h.stream_offset == len(head)
    assert parse_data(h, head[HEADER_SIZE:]) == (xml, cookie)
    assert h.completed().encode()[16:] == head[16:HEADER_SIZE]  # only the magic changes


def test_layout_matches_libvirt():
    """92 bytes, magic, then host-endian u32s; XML + NUL + 64 KiB of zeros before the stream."""
    head = encode_head(XML, was_running=True)
    assert head[:16] == b"LibvirtQemudSave"
    version, data_len, running, compressed, cookie = struct.unpack_from("<5I", head, 16)
    assert (version, running, compressed, cookie) == (2, 1, 0, 0)
    assert data_len == len(XML) + 1 + 65536 and len(head) == 92 + data_len
    assert head[92:92 + len(XML) + 1] == XML.encode() + b"\0"


def _header(**kw) -> bytes:
    fields = {"version": 2, "data_len": 100, "running": 1, "compressed": 0, "cookie": 0} | kw
    return struct.pack("<16s5I56x", kw.pop("magic", b"LibvirtQemudSave"), *fields.values())


@pytest.mark.parametrize("data, message", [
    (b"LibvirtQemudSave", "shorter than its 92-byte header"),
    (b"QEVM" + bytes(88), "bad magic"),
    (_header(version=3), "version 3 is not supported"),
    (_header(compressed=1), "is compressed"),
    (_header(data_len=0), "claims 0 bytes of XML"),
    (_header(data_len=1 << 30), "claims 1073741824 bytes"),
    (_header(cookie=100), "cookie offset is past its data"),
], ids=["short", "magic", "version", "compressed", "empty", "huge", "cookie"])
def test_bad_headers(data, message):
    with pytest.raises(SaveImageError, match=message):
        parse_header(data)


def test_big_endian_header_accepted():
    head = struct.pack(">16s5I56x", MAGIC_PARTIAL, 2, 10, 0, 0, 0)
    assert parse_header(head) == SaveImageHeader(False, 10, False)


@pytest.mark.parametrize("data, message", [
    (b"<domain/>", "ends inside its domain XML"),
    (b"<domain/>" + bytes(91), None),
    (b"<domain/>" * 12, "not NUL-terminated"),
    (b"\xff\xfe" + bytes(98), "not UTF-8"),
    (bytes(100), "holds no domain XML"),
], ids=["short", "ok", "no-nul", "utf8", "empty"])
def test_bad_data(data, message):
    h = SaveImageHeader(True, 100, True)
    if message is None:
        assert parse_data(h, data) == ("<domain/>", None)
        return
    with pytest.raises(SaveImageError, match=message):
        parse_data(h, data[:100])


def test_nul_in_xml_refused():
    with pytest.raises(SaveImageError, match="NUL"):
        encode_head("<a>\0</a>", was_running=False)
