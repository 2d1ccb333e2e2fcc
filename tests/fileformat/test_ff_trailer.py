import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.fileformat import (
    CorruptTrailer,
    NoCommitRecord,
    SnapshotError,
    TrailerMetadata,
    UnsupportedVersion,
    decode_trailer_bytes,
    encode_trailer,
)
from vmsnap.fileformat.trailer import (
    COMMIT_SIZE,
    BlockChecksums,
    CommitRecord,
    RangeChecksum,
    xxh3,
)


def make_image(stream_end=5000):
    md = TrailerMetadata(qemu_version="10.0.0", machine_type="pc-q35-10.0",
                         command_line=["qemu-system-x86_64", "-m", "128"])
    blocks = [BlockChecksums("pc.ram", np.arange(10, dtype=np.uint64) * 77),
              BlockChecksums("pc.bios", np.array([5], dtype=np.uint64))]
    ranges = [RangeChecksum(0, 100, 123), RangeChecksum(4000, 1000, 456)]
    off, tr = encode_trailer(stream_end, md, blocks, ranges)
    assert off == 8192
    return b"s" * stream_end + b"\0" * (off - stream_end) + tr


def test_roundtrip():
    img = make_image()
    t = decode_trailer_bytes(img)
    assert t.metadata.machine_type == "pc-q35-10.0"
    assert t.metadata.command_line[0] == "qemu-system-x86_64"
    assert t.metadata.created.endswith("Z")
    assert t.commit.stream_end == 5000
    assert [b.name for b in t.blocks] == ["pc.ram", "pc.bios"]
    assert t.block("pc.ram").table.tolist() == [i * 77 for i in range(10)]
    assert t.ranges[1] == RangeChecksum(4000, 1000, 456)
    assert len(img) - COMMIT_SIZE == t.commit.body_offset + t.commit.body_length


def test_no_commit_record():
    with pytest.raises(NoCommitRecord):
        decode_trailer_bytes(b"QEVM" + b"\0" * 200)
    with pytest.raises(NoCommitRecord):
        decode_trailer_bytes(b"short")
    img = make_image()
    with pytest.raises(NoCommitRecord):  # truncated: record no longer last
        decode_trailer_bytes(img[:-10])


def test_corruptions():
    img = bytearray(make_image())
    bad = bytearray(img)
    bad[-64] ^= 1  # magic
    with pytest.raises(NoCommitRecord):
        decode_trailer_bytes(bytes(bad))
    bad = bytearray(img)
    bad[-30] ^= 1
    with pytest.raises(CorruptTrailer, match="commit record checksum"):
        decode_trailer_bytes(bytes(bad))
    bad = bytearray(img)
    bad[8192 + 40] ^= 1  # inside body JSON
    with pytest.raises(CorruptTrailer, match="body checksum"):
        decode_trailer_bytes(bytes(bad))


def test_unknown_version():
    img = make_image()
    rec = CommitRecord.parse(img[-64:], len(img))
    newer = CommitRecord(2, rec.body_offset, rec.body_length, rec.body_xxh3, rec.stream_end)
    with pytest.raises(UnsupportedVersion, match="unsupported vmsnap format version 2"):
        decode_trailer_bytes(img[:-64] + newer.pack())


def test_message_is_one_line():
    with pytest.raises(CorruptTrailer, match="commit record checksum") as e:
        decode_trailer_bytes(b"x" * 100 + CommitRecord(1, 0, 0, 0, 0).pack()[:-1] + b"!")
    assert "\n" not in str(e.value)


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_random_bytes(data):
    try:
        decode_trailer_bytes(data)
    except SnapshotError:
        pass


@given(st.binary(max_size=400), st.integers(0, 5000), st.data())
@settings(max_examples=500)
def test_random_body_with_valid_commit(body, pos, data):
    # a valid commit record around random bodies, and random mutations of a real trailer
    img = make_image()
    stream_end = 5000
    off = 8192
    fake = b"s" * stream_end + b"\0" * (off - stream_end) + body
    rec = CommitRecord(1, off, len(body), xxh3(body), stream_end)
    try:
        decode_trailer_bytes(fake + rec.pack())
    except SnapshotError:
        pass
    mut = bytearray(img)
    i = data.draw(st.integers(off, len(img) - 1))
    mut[i] = data.draw(st.integers(0, 255))
    try:
        decode_trailer_bytes(bytes(mut))
    except SnapshotError:
        pass


@given(st.lists(st.text(max_size=5), max_size=3), st.integers(0, 10))
@settings(max_examples=100)
def test_random_json_with_valid_checksums(keys, n):
    # hand-made bodies with valid framing but odd JSON content
    import json
    import struct
    for js in ([], {"format_version": 1}, {k: n for k in keys}, {"blocks": 5},
               {"format_version": 1, "checksum": "xxh3-64", "stream_end": 5000,
                "page_size": 4096, "created": "x", "blocks": [{"name": "a", "pages": n}],
                "ranges": [{"start": 0, "length": 1, "xxh3": "zz"}]}):
        raw = json.dumps(js).encode()
        body = struct.pack("<8sII", b"VMSNAPT1", 1, len(raw)) + raw
        body += b"\0" * (-len(body) % 8)
        rec = CommitRecord(1, 8192, len(body), xxh3(body), 5000)
        try:
            decode_trailer_bytes(b"\0" * 8192 + body + rec.pack())
        except SnapshotError:
            pass


def test_pending_page_checksums():
    """A trailer committed before its page checksums: empty tables, marked pending; the mark
    with tables, or any other value, is a corrupt trailer."""
    md = TrailerMetadata(machine_type="pc-q35-10.0")
    empty = [BlockChecksums("pc.ram", np.zeros(0, np.uint64))]
    off, tr = encode_trailer(5000, md, empty, [RangeChecksum(0, 100, 1)], sealed=False)
    t = decode_trailer_bytes(b"s" * off + tr)
    assert not t.sealed and t.block("pc.ram").pages == 0
    assert decode_trailer_bytes(make_image()).sealed
    full = [BlockChecksums("pc.ram", np.arange(3, dtype=np.uint64))]
    off, tr = encode_trailer(5000, md, full, [], sealed=False)
    with pytest.raises(CorruptTrailer, match="pending"):
        decode_trailer_bytes(b"s" * off + tr)
    md.extra = {}
    off, tr = encode_trailer(5000, md, empty, [], sealed=False)
    bad = tr.replace(b'"page_checksums":"pending"', b'"page_checksums":"elapsed"')
    body_len = len(bad) - COMMIT_SIZE
    commit = CommitRecord(1, off, body_len, xxh3(bad[:body_len]), 5000)
    with pytest.raises(CorruptTrailer, match="page_checksums"):
        decode_trailer_bytes(b"s" * off + bad[:body_len] + commit.pack())
