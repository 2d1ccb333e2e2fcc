"""The postcopy wire pieces: commands a source sends, return-path messages it reads."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsnap.stream import StreamDecoder, StreamError, encoder
from vmsnap.stream import constants as C
from vmsnap.stream import events as ev
from vmsnap.stream import postcopy as pc


def rp(kind: int, payload: bytes) -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def test_commands_bytes():
    assert pc.open_return_path() == b"\x08\x00\x01\x00\x00"
    assert pc.postcopy_advise(4096, 4096) == (b"\x08\x00\x03\x00\x10"
                                              + struct.pack(">QQ", 4096, 4096))
    assert pc.postcopy_ram_discard("pc.ram", [(0, 4096)]) == (
        b"\x08\x00\x06\x00\x19" + b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0, 4096))
    with pytest.raises(ValueError):
        pc.postcopy_ram_discard("pc.ram", [])


def test_packaged_wraps_listen_devices_ping_run():
    devices = b"\x04device-bytes"
    out = pc.packaged(devices)
    assert out[:5] == b"\x08\x00\x07\x00\x04"
    (size,) = struct.unpack(">I", out[5:9])
    blob = out[9:]
    assert len(blob) == size
    assert blob == (b"\x08\x00\x04\x00\x00" + devices + pc.ping(3) + b"\x08\x00\x05\x00\x00")


def test_device_sections_strip_eof_and_vmdesc():
    full = b"\x04" + b"\x00" * 20
    vmdesc = b'{"page_size": 4096, "devices": []}'
    assert pc.device_sections(full + encoder.eof() + encoder.vmdescription(vmdesc)) == full
    assert pc.device_sections(full + encoder.eof()) == full
    with pytest.raises(StreamError):
        pc.device_sections(full + b"\x7e")


def test_head_with_postcopy_commands_decodes():
    """What a postcopy source sends first is a stream our own decoder reads back."""
    blocks = [ev.RamBlock("pc.ram", 1 << 20)]
    data = (encoder.header() + encoder.configuration("pc-q35-7.2")
            + pc.open_return_path() + pc.postcopy_advise(4096, 4096)
            + encoder.ram_start(2, blocks) + encoder.eos() + encoder.footer(2))
    dec = StreamDecoder()
    dec.feed(data)
    out = list(dec.events())
    cmds = [e.cmd for e in out if isinstance(e, ev.Command)]
    assert cmds == [1, 3] and dec.postcopy_advised
    assert any(isinstance(e, ev.RamBlocks) for e in out)


def test_return_path_messages():
    dec = pc.ReturnPathDecoder()
    data = (rp(2, struct.pack(">I", 1))
            + rp(3, struct.pack(">QIB", 0x100000, 4096, 6) + b"pc.ram")
            + rp(4, struct.pack(">QI", 0x2000, 8192))
            + rp(7, b"") + rp(1, struct.pack(">I", 0)))
    got = []
    for i in range(len(data)):  # byte by byte: framing survives any split
        got += dec.feed(data[i:i + 1])
    assert got == [pc.Pong(1), pc.ReqPages("pc.ram", 0x100000, 4096),
                   pc.ReqPages("pc.ram", 0x2000, 8192), pc.OtherMessage(7, b""), pc.Shut(0)]


@pytest.mark.parametrize("bad", [
    rp(4, struct.pack(">QI", 0, 4096)),  # REQ_PAGES before any block was named
    rp(1, b"\x00\x00"),  # SHUT with the wrong length
    struct.pack(">HH", 9, 600) + b"\x00" * 600,  # longer than QEMU allows
    rp(3, struct.pack(">QIB", 0, 4096, 9) + b"pc.ram"),  # idstr length lies
])
def test_return_path_rejects_malformed(bad):
    with pytest.raises(StreamError):
        list(pc.ReturnPathDecoder().feed(bad))


@given(st.binary(max_size=300))
def test_return_path_decoder_never_crashes(data):
    try:
        list(pc.ReturnPathDecoder().feed(data))
    except StreamError:
        pass


# ------------------------------------------------------------------ postcopy recovery
def recv_bitmap_reply(block: str, bits: np.ndarray, *, size: int | None = None,
                      end: int = C.RECV_BITMAP_ENDING) -> bytes:
    """What a recovering QEMU sends for RECV_BITMAP (bytes as captured from 7.2 and 10):
    RP header covering the counted name only, then be64 size, LE bitmap, be64 marker."""
    raw = np.packbits(np.asarray(bits, dtype=np.uint8), bitorder="little").tobytes()
    raw = raw.ljust(pc.bitmap_size(len(bits)), b"\0")
    name = bytes([len(block)]) + block.encode()
    return (rp(C.MIG_RP_MSG_RECV_BITMAP, name) + struct.pack(">Q", size or len(raw)) + raw
            + struct.pack(">Q", end))


def test_recovery_commands_bytes():
    assert pc.recv_bitmap("pc.ram") == b"\x08\x00\x0a\x00\x07\x06pc.ram"
    assert pc.postcopy_resume() == b"\x08\x00\x09\x00\x00"
    assert [pc.bitmap_size(n) for n in (1, 64, 65, 131072)] == [8, 8, 16, 16384]


def test_recv_bitmap_as_qemu_sends_it():
    """As QEMU 10 sent it (512 MiB pc.ram, 3 pages received, then the RESUME_ACK and the
    first page request after it: the first 24 bytes and the tail are the captured ones),
    split at every byte."""
    bits = np.zeros(131072, dtype=bool)
    bits[[6, 7, 1000]] = True
    data = (recv_bitmap_reply("pc.ram", bits) + recv_bitmap_reply("/rom@etc/acpi/rsdp", [1])
            + bytes.fromhex("0006000400000001" "0003001300000000001020000000100006")
            + b"pc.ram")
    assert data[:24].hex() == "000500070670632e72616d0000000000004000c000000000"
    dec = pc.ReturnPathDecoder({"pc.ram": 131072, "/rom@etc/acpi/rsdp": 1})
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert not dec.truncated
    assert [type(m) for m in got] == [pc.RecvBitmap, pc.RecvBitmap, pc.ResumeAck, pc.ReqPages]
    assert got[0].block == "pc.ram" and np.array_equal(got[0].received, bits)
    assert got[1].received.tolist() == [True]
    assert got[2] == pc.ResumeAck(1) and got[3] == pc.ReqPages("pc.ram", 0x102000, 4096)


BITS = np.ones(100, dtype=bool)


@pytest.mark.parametrize("bad", [
    recv_bitmap_reply("pc.ram", BITS, size=8),  # size does not match the block's pages
    recv_bitmap_reply("pc.ram", BITS, size=1 << 62),  # hostile size: refused before reading
    recv_bitmap_reply("pc.ram", BITS, end=0),  # ending marker missing
    recv_bitmap_reply("pc.rom", BITS),  # a block not asked for
    rp(C.MIG_RP_MSG_RECV_BITMAP, b"\x09pc.ram"),  # name length lies
    rp(C.MIG_RP_MSG_RECV_BITMAP, b""),  # no name at all
    rp(C.MIG_RP_MSG_RESUME_ACK, b"\x00\x01"),  # RESUME_ACK with the wrong length
])
def test_recv_bitmap_rejects_hostile(bad):
    with pytest.raises(StreamError):
        list(pc.ReturnPathDecoder({"pc.ram": 100}).feed(bad))


def test_recv_bitmap_truncated_is_seen():
    whole = recv_bitmap_reply("pc.ram", BITS)
    for cut in (6, 7 + 8, len(whole) - 1):
        dec = pc.ReturnPathDecoder({"pc.ram": 100})
        assert list(dec.feed(whole[:cut])) == [] and dec.truncated


@given(st.binary(max_size=300))
def test_recovering_decoder_never_crashes(data):
    try:
        list(pc.ReturnPathDecoder({"pc.ram": 100, "a": 1}).feed(data))
    except StreamError:
        pass
