"""One-stream receive: runs of plain page records go straight into aligned buffers
(decoder.page_run + io.records.PageRecordReader); every other record goes to the decoder.
The file must be byte for byte the one the decoder-only path writes, whatever the split."""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest

from vmsnap.errors import VmsnapError
from vmsnap.fileformat.trailer import TrailerMetadata
from vmsnap.fileformat.writer import SnapshotWriter
from vmsnap.io import records
from vmsnap.ops.receive import receive
from vmsnap.stream import RamBlock
from vmsnap.stream import encoder as E
from vmsnap.stream.decoder import leading_pages

from ._streams import VMDESC

PS = 4096
BLOCKS = (RamBlock("pc.ram", 300 * PS), RamBlock("pc.bios", 8 * PS))


def _stream(bad_offset: bool = False) -> bytes:
    """Long page runs that cross writer buffers and readv batches, broken by zero records,
    a block switch, EOS + a new section, a CONTINUE page after zero records."""
    rng = np.random.default_rng(3)
    sid = 2

    def pages(block: str, idx: list[int] | range, cont: bool = False) -> bytes:
        offs = np.array(idx, np.uint64) * np.uint64(PS)
        return E.page_records(block, offs, rng.integers(0, 256, len(offs) * PS, np.uint8),
                              cont)

    out = E.header() + E.configuration("pc-q35-7.2", ())
    out += E.ram_start(sid, BLOCKS) + E.eos() + E.footer(sid) + E.section_part(sid)
    out += pages("pc.ram", range(0, 150))
    out += E.zero_records("pc.ram", np.array([150, 151], np.uint64) * np.uint64(PS), 0, True)
    out += pages("pc.ram", range(152, 160), cont=True)
    out += pages("pc.bios", range(8))
    out += pages("pc.ram", [7, 3, 299, 7])  # again, out of order, last copy wins
    if bad_offset:
        out += pages("pc.ram", [300], cont=True)
    out += E.eos() + E.footer(sid) + E.section_part(sid)
    out += pages("pc.ram", range(160, 300))
    out += E.eos() + E.footer(sid)
    out += E.section_end(sid) + E.eos() + E.footer(sid)
    out += b"\x04\x00\x00\x00\x07\x05timer" + bytes(range(40)) + E.footer(7)
    return out + E.eof() + E.vmdescription(VMDESC)


def _save(tmp_path, name: str, data: bytes, over_socket: bool, send: int = 1 << 30,
          buffer_pages: int = 64) -> bytes:
    path = tmp_path / name
    # one creation time: two saves a second apart would differ in their trailers
    writer = SnapshotWriter(path, TrailerMetadata(created="2026-12-03T00:00:00Z"),
                            direct=False, buffer_size=buffer_pages * PS)
    if not over_socket:
        receive(io.BytesIO(data), writer)
        return path.read_bytes()
    a, b = socket.socketpair()

    def feed() -> None:
        with a:
            try:
                for i in range(0, len(data), send):
                    a.sendall(data[i:i + send])
            except OSError:
                pass

    t = threading.Thread(target=feed)
    t.start()
    try:
        with b:
            receive(socket.SocketIO(b, "rb"), writer)
    finally:
        t.join()
    return path.read_bytes()


@pytest.mark.parametrize(("send", "buffer_pages"),
                         [(1 << 30, 64), (4104 * 3 + 5, 64), (7, 64), (1 << 30, 8)])
def test_direct_page_records_write_the_same_file(tmp_path, monkeypatch, send, buffer_pages):
    """Buffers of 8 pages: the bytes read past a zero record or a section's end (up to a
    buffer's worth, and the decoder's reads) are more than one buffer holds."""
    reads: list[int] = []
    real = records.PageRecordReader.read

    def counting(self, *a, **kw):
        got = real(self, *a, **kw)
        reads.append(got[0])
        return got

    monkeypatch.setattr(records.PageRecordReader, "read", counting)
    data = _stream()
    plain = _save(tmp_path, "plain.snap", data, over_socket=False)
    assert not reads
    direct = _save(tmp_path, "direct.snap", data, over_socket=True, send=send,
                   buffer_pages=buffer_pages)
    assert sum(reads) > 100  # pages came straight into the aligned buffers
    assert direct == plain


def test_page_record_past_block_end_fails_like_the_decoder(tmp_path):
    data = _stream(bad_offset=True)
    with pytest.raises(VmsnapError) as plain:
        _save(tmp_path, "plain.snap", data, over_socket=False)
    with pytest.raises(VmsnapError) as direct:
        _save(tmp_path, "direct.snap", data, over_socket=True)
    assert str(direct.value) == str(plain.value)
    assert "outside block 'pc.ram'" in str(direct.value)
    assert not list(tmp_path.iterdir())


def test_truncated_inside_a_page_run(tmp_path):
    data = _stream()
    cut = data[:len(data) // 3]
    with pytest.raises(VmsnapError, match="truncated"):
        _save(tmp_path, "direct.snap", cut, over_socket=True)


def test_leading_pages():
    mask = PS - 1
    words = np.array([0x1000 | 0x28, 0x2000 | 0x28, 0x3000 | 0x28, 0x10], dtype=">u8")
    assert leading_pages(words, 4 * PS, PS) == 3
    assert leading_pages(words[:3], 3 * PS, PS) == 2  # 0x3000 is past a 3-page block
    assert leading_pages(words[:3], 4 * PS, PS) == 3
    assert leading_pages(np.array([0x1000 | 0x08], dtype=">u8"), 4 * PS, PS) == 0  # no CONT
    assert leading_pages(words, PS - 1 & ~mask, PS) == 0
