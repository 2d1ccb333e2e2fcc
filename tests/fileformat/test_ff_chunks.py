"""Checksum tables in chunks ("table_chunks"): the metadata and the stream ranges check
without reading the tables, each chunk is read and checked only where one of its entries is
used, a damaged or tampered chunk is refused there (and only there), and a file without
chunks is checked whole as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streambytes import prefix, tail

from testbed.craft import reseal, trailer_parts, unchunk
from vmsnap.fileformat import SnapshotWriter, open_snapshot
from vmsnap.fileformat import trailer as trailer_mod
from vmsnap.fileformat.errors import ChecksumMismatch, CorruptTrailer
from vmsnap.fileformat.trailer import TrailerMetadata, xxh3
from vmsnap.io.direct import DirectFile

RAM = 8 << 20
PAGES = RAM // 4096
ENTRIES = 256  # per chunk: pc.ram's 2048 entries in 8 chunks
KEY = bytes(range(32))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(trailer_mod, "CHUNK_ENTRIES", ENTRIES)


def written(path: Path, key: bytes | None = None) -> Path:
    w = SnapshotWriter(str(path), TrailerMetadata(qemu_version="10.0.0",
                                                  machine_type="pc-q35-10.0"),
                       signing_key=key)
    w.begin(prefix("pc-q35-10.0", [("pc.ram", RAM)]), [("pc.ram", RAM)])
    w.write_pages("pc.ram", np.arange(PAGES, dtype=np.uint64) * 4096,
                  np.random.default_rng(1).integers(0, 256, RAM, dtype=np.uint8).data)
    w.finish(tail())
    return path


def tables_span(path: Path) -> tuple[int, int]:
    """(file offset, length) of the checksum tables of `path`."""
    with open_snapshot(path) as snap:
        assert snap.trailer is not None
        commit, head = snap.trailer.commit, snap.trailer.head
    return commit.body_offset + len(head), commit.body_length - len(head)


@pytest.fixture
def reads(monkeypatch):
    """Every (offset, length) read through a snapshot's buffered descriptor."""
    seen: list[tuple[int, int]] = []
    real = DirectFile.pread_meta

    def pread_meta(self, offset, length):
        seen.append((offset, length))
        return real(self, offset, length)

    monkeypatch.setattr(DirectFile, "pread_meta", pread_meta)
    return seen


def chunks_read(seen, span) -> set[int]:
    at, length = span
    return {(o - at) // (ENTRIES * 8) for o, n in seen if o < at + length and o + n > at}


def check(snap, first: int, count: int) -> None:
    b = snap.block("pc.ram")
    snap.check_pages(b, first, count, snap.read_pages(b, first, count), first)


def test_the_stream_ranges_check_without_the_tables(tmp_path, small_chunks, reads):
    """The open and the stream ranges' check read no table; a page's check reads the chunk
    that holds its entry, once, and the pages of a run across a chunk's end both."""
    path = written(tmp_path / "a", KEY)
    span = tables_span(path)
    reads.clear()
    with open_snapshot(path) as snap:
        snap.check_stream_ranges()
        assert chunks_read(reads, span) == set()
        check(snap, 3, 1)
        check(snap, 5, 1)
        assert chunks_read(reads, span) == {0}
        check(snap, ENTRIES * 3 - 2, 4)
        assert chunks_read(reads, span) == {0, 2, 3}
        assert snap.verify().pages == PAGES  # then every chunk
        assert chunks_read(reads, span) == set(range(PAGES // ENTRIES))


def test_a_damaged_chunk_is_refused_where_it_is_used(tmp_path, small_chunks, reads):
    """A flipped bit in chunk 5 lets the ranges and the pages of other chunks check, and
    refuses any page of chunk 5 (the same one line as a damaged body), every time."""
    path = written(tmp_path / "a", KEY)
    at, _ = tables_span(path)
    with open(path, "r+b") as f:
        f.seek(at + 5 * ENTRIES * 8 + 17)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 4]))
    with open_snapshot(path) as snap:
        snap.check_stream_ranges()
        check(snap, 0, ENTRIES * 5)
        for _ in range(2):
            with pytest.raises(CorruptTrailer, match="^corrupt trailer: body checksum mismatch$"):
                check(snap, ENTRIES * 5 + 100, 1)
        check(snap, ENTRIES * 6, ENTRIES)
        with pytest.raises(CorruptTrailer, match="body checksum mismatch"):
            snap.verify()


def test_a_tampered_chunk_is_refused(tmp_path, small_chunks):
    """An attacker (no key) who changes a page and its table entry, then fixes the chunk's
    xxh3, the head's and the body's checksums, is refused at that chunk by its signed
    SHA-256; the page itself then checks against the altered entry, but is never used."""
    path = written(tmp_path / "a", KEY)
    entry = ENTRIES * 2 + 7

    def edit_tables(tables: bytearray) -> None:
        tables[entry * 8:entry * 8 + 8] = (12345).to_bytes(8, "little")

    def edit(md: dict) -> None:
        _, _, _, tables = trailer_parts(path)
        altered = bytearray(tables)
        edit_tables(altered)
        md["table_chunks"]["xxh3"][2] = f"{xxh3(altered[ENTRIES * 16:ENTRIES * 24]):016x}"

    reseal(path, edit, edit_tables, head_checksum=True)
    with open_snapshot(path) as snap:
        snap.check_stream_ranges()
        check(snap, 0, ENTRIES * 2)
        with pytest.raises(CorruptTrailer, match="differ from the signed ones"):
            check(snap, entry, 1)


def test_damaged_metadata_is_refused_before_any_table_is_read(tmp_path, small_chunks, reads):
    """The metadata (with the stream ranges' checksums) is checked against the commit
    record's checksum of the head: a flipped digit in it is refused at the open."""
    path = written(tmp_path / "a")
    _, _, md, _ = trailer_parts(path)
    span = tables_span(path)
    start = path.read_bytes().rindex(json.dumps(md["ranges"][0]["xxh3"]).encode(), 0, span[0])
    with open(path, "r+b") as f:
        f.seek(start + 3)
        digit = f.read(1)
        f.seek(-1, 1)
        f.write(b"0" if digit != b"0" else b"1")
    reads.clear()
    with pytest.raises(CorruptTrailer, match="body checksum mismatch"):
        open_snapshot(path)
    assert chunks_read(reads, span) == set()


def test_a_file_without_chunks_is_checked_whole(tmp_path, small_chunks):
    """A file as older vmsnaps wrote it: its tables are read and checked whole where the
    ranges are checked (the body's checksum vouches for theirs)."""
    path = written(tmp_path / "a")
    unchunk(path)
    with open_snapshot(path) as snap:
        assert snap.trailer is not None and snap.trailer.chunks is None
        assert snap.verify().pages == PAGES
    at, _ = tables_span(path)
    with open(path, "r+b") as f:
        f.seek(at + 5 * ENTRIES * 8 + 17)
        f.write(b"\xff")
    with open_snapshot(path) as snap, \
            pytest.raises(CorruptTrailer, match="body checksum mismatch"):
        snap.check_stream_ranges()


@pytest.mark.parametrize("edit", [
    lambda tc: tc.update(entries=0), lambda tc: tc.update(entries=True),
    lambda tc: tc["xxh3"].pop(), lambda tc: tc["xxh3"].__setitem__(0, "xyz"),
    lambda tc: tc["sha256"].pop(), lambda tc: tc.pop("sha256"),
    lambda tc: tc.update(entries=ENTRIES * 2),
])
def test_invalid_chunk_lists_are_refused(tmp_path, small_chunks, edit):
    """Chunk lists that do not describe the tables (a count, a digest, a chunk size, the
    SHA-256 list of a signed file) are refused at the open, in one line."""
    path = written(tmp_path / "a", KEY)
    reseal(path, lambda md: edit(md["table_chunks"]), head_checksum=True)
    with pytest.raises(CorruptTrailer, match="'table_chunks' invalid"):
        open_snapshot(path)


def test_a_page_failing_its_checked_chunk_is_named(tmp_path, small_chunks):
    """A chunk that checks out still finds a bad page (the entries are the page's)."""
    path = written(tmp_path / "a", KEY)
    with open_snapshot(path) as snap:
        b = snap.block("pc.ram")
        data = bytearray(snap.read_pages(b, 700, 1))
        data[9] ^= 1
        with pytest.raises(ChecksumMismatch, match="offset 0x2bc000"):
            snap.check_pages(b, 700, 1, memoryview(data), 700)
