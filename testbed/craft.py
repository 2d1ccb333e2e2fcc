"""Craft hostile snapshot files as an attacker would: edit the trailer's metadata and re-seal
it (new body checksum and commit record), so the file still passes `vmsnap verify`."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import xxhash

from vmsnap.fileformat.layout import bitmap_size, compute_layout
from vmsnap.fileformat.reader import open_snapshot
from vmsnap.fileformat.trailer import (
    COMMIT_SIZE,
    CommitRecord,
    RangeChecksum,
    Trailer,
    chunk_digests,
    decode_trailer_bytes,
    encode_trailer,
    xxh3,
)

_HEAD = struct.Struct("<8sII")


def trailer_parts(path: Path) -> tuple[int, int, dict, bytes]:
    """(body offset, stream_end, metadata JSON as parsed, checksum tables) of a vmsnap file."""
    data = path.read_bytes()
    rec = CommitRecord.parse(data[-COMMIT_SIZE:], len(data))
    body = data[rec.body_offset:rec.body_offset + rec.body_length]
    _magic, _version, jlen = _HEAD.unpack_from(body)
    jend = _HEAD.size + jlen
    return rec.body_offset, rec.stream_end, json.loads(body[_HEAD.size:jend]), \
        body[jend + (-jend % 8):]


def write_trailer(path: Path, body_offset: int, stream_end: int, js: bytes,
                  tables: bytes, jlen: int | None = None, head_checksum: bool = False) -> None:
    """Replace the trailer of `path` by one with metadata bytes `js` (and a JSON length
    field of `jlen`, default len(js)), sealed with a valid body checksum and commit record
    (with the checksum of the body's head if `head_checksum`: its tables then check chunk
    by chunk, if the metadata has "table_chunks"; else whole, as in older files)."""
    head = _HEAD.pack(b"VMSNAPT1", 1, len(js) if jlen is None else jlen) + js
    head += b"\0" * (-len(head) % 8)
    body = head + tables
    record = CommitRecord(1, body_offset, len(body), xxh3(body), stream_end,
                          xxh3(head) if head_checksum else 0).pack()
    with open(path, "r+b") as f:
        f.truncate(body_offset)
        f.seek(body_offset)
        f.write(body + record)


def reseal(path: Path, edit: Callable[[dict], None],
           edit_tables: Callable[[bytearray], None] | None = None,
           head_checksum: bool = False) -> None:
    """Let `edit` change the parsed metadata of `path` in place (and `edit_tables` its
    checksum tables), then re-seal the file (see write_trailer); the signature, if any, is
    kept as it was (the attacker has no key)."""
    body_offset, stream_end, md, tables = trailer_parts(path)
    edit(md)
    table_bytes = bytearray(tables)
    if edit_tables is not None:
        edit_tables(table_bytes)
    write_trailer(path, body_offset, stream_end,
                  json.dumps(md, separators=(",", ":"), sort_keys=True).encode(),
                  bytes(table_bytes), head_checksum=head_checksum)


def rechunk(path: Path, entries: int) -> None:
    """Cut the checksum tables of `path` in chunks of `entries` (digests recomputed, as
    vmsnap would with CHUNK_ENTRIES = `entries`; a signature no longer matches: restore it
    with a command line given), so that a small guest's RAM spans several chunks."""
    def edit(md: dict) -> None:
        _, _, _, tables = trailer_parts(path)
        parts, at = [], 0
        for b in md["blocks"]:
            parts.append(tables[at:at + 8 * b["pages"]])
            at += 8 * b["pages"]
        md["table_chunks"] = chunk_digests(parts, "signature" in md, entries)

    reseal(path, edit, head_checksum=True)


def table_entry_offset(path: Path, block: str, entry: int) -> int:
    """The file offset of checksum table entry `entry` of `block` (8 bytes)."""
    _, _, md, tables = trailer_parts(path)
    first = 0
    for b in md["blocks"]:
        if b["name"] == block:
            return path.stat().st_size - COMMIT_SIZE - len(tables) + 8 * (first + entry)
        first += b["pages"]
    raise KeyError(block)


def unchunk(path: Path) -> None:
    """Make `path` a file as vmsnap wrote it before its tables were checked in chunks (no
    "table_chunks", no head checksum in the commit record; its signature no longer
    matches: restore it with a command line given)."""
    reseal(path, lambda md: md.pop("table_chunks"))


def sparse_copy(src: Path, dst: Path) -> Path:
    """Copy `src` to `dst` keeping holes (crafted files stay small on disk)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole_at = os.lseek(fi.fileno(), data_at, os.SEEK_HOLE)
            os.copy_file_range(fi.fileno(), fo.fileno(), hole_at - data_at, data_at, data_at)
            pos = hole_at
        fo.truncate(size)
    return dst


def resign(path: Path, edit: Callable[[Trailer], None], key: bytes | None) -> None:
    """Let `edit` change the decoded trailer of `path`, then write it back signed with `key`
    (a host key: the file then looks like one that host saved)."""
    trailer = decode_trailer_bytes(path.read_bytes())
    edit(trailer)
    offset, data = encode_trailer(trailer.commit.stream_end, trailer.metadata, trailer.blocks,
                                  trailer.ranges, key)
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(data)


def rename_block(path: Path, old: str, new: str, key: bytes | None) -> None:
    """Rename RAM block `old` to `new` (same length) in the stream and the trailer, with the
    range checksums recomputed: a file that passes `verify` with a block name of our choice."""
    if len(old.encode()) != len(new.encode()):
        raise ValueError("names must have the same length")
    data = bytearray(path.read_bytes())
    needle = bytes([len(old.encode())]) + old.encode()
    at = data.index(needle) + 1
    data[at:at + len(old.encode())] = new.encode()
    path.write_bytes(data)

    def edit(trailer: Trailer) -> None:
        for b in trailer.blocks:
            if b.name == old:
                b.name = new
        trailer.ranges = [RangeChecksum(r.start, r.length, xxh3(data[r.start:r.start + r.length]))
                          for r in trailer.ranges]
    resign(path, edit, key)


def grow_last_block(src: Path, dst: Path, used_length: int) -> Path:
    """A copy of vmsnap file `src` whose last RAM block claims `used_length` bytes: MEM_SIZE
    total, block header, layout and stream tail moved to match and the trailer re-sealed, so
    only the size is a lie. The new bitmap and page area are holes: `dst` takes as little
    disk as `src` and still passes `vmsnap verify` if vmsnap can index it."""
    with open_snapshot(src) as snap:
        blocks, tail, trailer = snap.blocks, snap.tail, snap.trailer
        tables = trailer.blocks  # read while the file is open (they load where used)
        header = bytearray(snap.header_bytes)
        last = blocks[-1]
        old_bitmap = snap._file.pread_meta(last.bitmap_offset, bitmap_size(last.npages))
        old_pages = snap._file.pread_meta(last.pages_offset, last.used_length)
    sizes = [(b.name, b.used_length) for b in blocks[:-1]] + [(last.name, used_length)]
    layout = compute_layout(sizes, blocks[0].idstr_offset, last.page_size)
    mem_size = int.from_bytes(header[-8:], "big")
    header[-8:] = (sum(n for _, n in sizes) | mem_size & (last.page_size - 1)).to_bytes(8, "big")
    new = layout.blocks[-1]
    sparse_copy(src, dst)
    with open(dst, "r+b") as f:
        f.truncate(new.idstr_offset)
        f.seek(0)
        f.write(header)
        for where, data in ((new.idstr_offset, new.record()), (new.bitmap_offset, old_bitmap),
                            (new.pages_offset, old_pages), (layout.tail_offset, tail)):
            f.seek(where)
            f.write(data)
    ranges, start = [], 0
    for b in layout.blocks:
        ranges.append(_range(dst, start, b.bitmap_offset + b.bitmap_size - start))
        start = b.end
    ranges.append(_range(dst, layout.tail_offset, len(tail)))
    stream_end = layout.tail_offset + len(tail)
    trailer.metadata.stream_end = stream_end
    offset, data = encode_trailer(stream_end, trailer.metadata, tables, ranges)
    with open(dst, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(data)
    return dst


def _range(path: Path, start: int, length: int) -> RangeChecksum:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left:
            chunk = f.read(min(left, 8 << 20))
            digest.update(chunk)
            left -= len(chunk)
    return RangeChecksum(start, length, digest.intdigest())


def flip_bit(path: Path, position: int, mask: int = 0x01) -> None:
    """XOR the byte at `position` of `path` with `mask` in place (bit rot, as a disk makes it)."""
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def flip_page_bit(path: Path, block: str = "pc.ram", *, run: int = 0, byte: int = 100,
                  mask: int = 0x01) -> int:
    """Flip `mask` in byte `byte` of the middle page of present run `run` (0: first, -1:
    last) of `block` in the snapshot at `path`; return that page's number in the block."""
    with open_snapshot(path) as s:
        b = s.block(block)
        first, count = (int(x) for x in s.present_runs(b)[run])
        page = first + count // 2
        position = b.pages_offset + page * b.page_size + byte
    flip_bit(path, position, mask)
    return page
