"""rbd: and s3:// targets without QEMU: a snapshot written through SnapshotWriter reads back
page for page; commit is atomic (an aborted or crashed save leaves the previous snapshot);
one writer per RBD image; a deleted or corrupted S3 chunk and wrong credentials fail in one
line naming the page or the problem."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest

from vmsnap import targets
from vmsnap.fileformat import (
    ChecksumMismatch,
    SnapshotError,
    SnapshotWriter,
    TrailerMetadata,
    open_snapshot,
)
from vmsnap.io import FileLockedError
from vmsnap.targets import s3_objects

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fileformat"))
import streambytes  # noqa: E402

PS = 4096
BLOCKS = [("pc.ram", 40 << 20), ("pc.bios", 0x40000)]


def write(url: str, seed: int, *, commit: bool = True, pages_every: int = 3):
    """Write a snapshot with every `pages_every`-th page random (the rest zero, never
    written), a rewrite of some pages, and return (writer, expected pc.ram)."""
    rng = np.random.default_rng(seed)
    ram = np.zeros(BLOCKS[0][1], np.uint8)
    w = SnapshotWriter(url, TrailerMetadata(machine_type="pc-q35-10.0"))
    w.begin(streambytes.prefix("pc-q35-10.0", BLOCKS), BLOCKS)
    pages = np.arange(0, BLOCKS[0][1] // PS, pages_every, dtype=np.uint64)
    data = rng.integers(0, 256, len(pages) * PS, dtype=np.uint8)
    w.write_pages("pc.ram", pages * PS, data)
    again = pages[:: 7]
    redo = rng.integers(0, 256, len(again) * PS, dtype=np.uint8)
    w.write_pages("pc.ram", again * PS, redo)  # a live save rewrites pages in place
    ram.reshape(-1, PS)[pages.astype(np.int64)] = data.reshape(-1, PS)
    ram.reshape(-1, PS)[again.astype(np.int64)] = redo.reshape(-1, PS)
    if commit:
        w.finish(streambytes.tail())
    return w, ram


def check(url: str, ram: np.ndarray) -> None:
    with open_snapshot(url) as s:
        b = s.block("pc.ram")
        assert (b.present == ram.reshape(-1, PS).any(axis=1)).all()
        got = np.zeros_like(ram)
        for first, count in s.present_runs(b):
            mv = s.read_pages(b, int(first), int(count))
            got[first * PS:(first + count) * PS] = np.frombuffer(mv, np.uint8)
        assert (got == ram).all()
        for first, count in s.present_runs(b)[::97]:  # a lazy restore's page requests
            last = int(first + count - 1)
            mv = s.read_pages(b, last, 1, urgent=True)
            assert bytes(mv) == ram[last * PS:(last + 1) * PS].tobytes()
        s.verify()


def test_urls():
    assert targets.remote("/tmp/x.snap") is None and targets.remote("rbd") is None
    assert str(targets.remote("rbd:pool/img")) == "rbd:pool/img"
    assert targets.remote("s3://bucket/a/b.snap").name == "a/b.snap"
    for bad in ("rbd:pool", "rbd:/img", "s3://bucket", "s3://B/key", "s3://bucket/dir/"):
        with pytest.raises(targets.TargetError, match="malformed target"):
            targets.remote(bad)
    assert targets.normalize("rbd:p/i") == "rbd:p/i"
    assert targets.normalize("x.snap") == os.path.abspath("x.snap")


@pytest.mark.parametrize("manifest", [
    b"not json", b"[]", b'{"format": "other"}',
    b'{"format": FMT, "size": 1152921504606846976, "chunk_size": 4194304, "prefix": P, '
    b'"runs": []}',  # 1 EiB: refused before anything is allocated for it
    b'{"format": FMT, "size": -1, "chunk_size": 4194304, "prefix": P, "runs": []}',
    b'{"format": FMT, "size": 8388608, "chunk_size": 0, "prefix": P, "runs": []}',
    b'{"format": FMT, "size": 8388608, "chunk_size": true, "prefix": P, "runs": []}',
    b'{"format": FMT, "size": 8388608, "chunk_size": 4194304, "prefix": "../x/", "runs": []}',
    b'{"format": FMT, "size": 8388608, "chunk_size": 4194304, "prefix": P, "runs": [[1, 2]]}',
    b'{"format": FMT, "size": 8388608, "chunk_size": 4194304, "prefix": P, "runs": [[0]]}',
    b'{"format": FMT, "size": 8388608, "chunk_size": 4194304, "prefix": P, "runs": [[-1, 1]]}',
])
def test_hostile_manifest_is_one_line(monkeypatch, manifest):
    """A manifest object's fields are checked before use (no asserts: they vanish under -O)."""
    r = targets.remote("s3://bucket/vm.snap")
    body = (manifest.replace(b"FMT", repr(s3_objects.MANIFEST_FORMAT).replace("'", '"').encode())
            .replace(b"P", b'"' + s3_objects._chunks_root(r.name).encode() + b'x/"'))
    monkeypatch.setattr(s3_objects, "_get_small", lambda *a: body)
    with pytest.raises(targets.TargetError, match="not a vmsnap snapshot manifest"):
        s3_objects._read_manifest(r)
    good = body.split(b'"runs"')[0] + b'"runs": [[1, 1]]}'
    if b'"size": 8388608, "chunk_size": 4194304' in good and b"../" not in good:
        monkeypatch.setattr(s3_objects, "_get_small", lambda *a: good)
        assert s3_objects._read_manifest(r).present.tolist() == [False, True]


@pytest.fixture(params=["rbd", "s3"])
def url(request):
    return request.getfixturevalue(f"{request.param}_url")


def test_roundtrip_and_replace(url):
    assert not targets.exists(url)
    _, ram = write(url, 1)
    assert targets.exists(url)
    check(url, ram)
    _, ram2 = write(url, 2, pages_every=5)  # a second save replaces the first
    check(url, ram2)


def test_rewrites_after_upload(s3_url, monkeypatch):
    """Chunks evicted (uploaded) and then written again (live saves) keep both writes."""
    monkeypatch.setattr(s3_objects, "CACHED_CHUNKS", 1)
    _, ram = write(s3_url, 3)
    check(s3_url, ram)


def test_failed_save_keeps_previous(url):
    _, ram = write(url, 4)
    w, _ = write(url, 5, commit=False)
    w.abort()
    check(url, ram)
    if url.startswith("s3://"):  # the aborted save's chunks are gone, the live ones stay
        r = targets.remote(url)
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket=r.container, Prefix=r.name)["Contents"]]
        prefixes = {k.rsplit("/", 1)[0] for k in keys if ".chunks/" in k}
        assert len(prefixes) == 1, prefixes


def test_crashed_save_is_not_taken_for_a_snapshot(url):
    """A writer that never commits (a crash: no abort runs) leaves the previous snapshot."""
    _, ram = write(url, 6)
    w, _ = write(url, 7, commit=False)
    w._stop_worker()  # noqa: SLF001 - simulate the process dying: no abort, no commit
    check(url, ram)


def test_one_writer_per_image(rbd_url):
    w = SnapshotWriter(rbd_url)
    w.reserve()
    try:
        with pytest.raises(FileLockedError, match="being saved by another process"):
            SnapshotWriter(rbd_url).reserve()
    finally:
        w.abort()
    again = SnapshotWriter(rbd_url)
    again.reserve()  # released: a new writer gets it
    again.abort()


def test_overlapping_writes_land_in_order(rbd_url):
    """The last write of a page stays: librbd does not order overlapping asynchronous writes
    (59 of 66 pages came out stale before the sink waited for them), and a live save writes
    pages again while earlier writes of them are in flight."""
    from vmsnap.targets import rbd_image

    sink = rbd_image.Sink(targets.remote(rbd_url))
    try:
        sink.truncate(64 * PS)
        rng = np.random.default_rng(0)
        last = np.zeros(64, np.uint8)
        for i in range(1500):
            first, n, value = int(rng.integers(0, 62)), int(rng.integers(1, 4)), i % 251 + 1
            sink.write_at(first * PS, [memoryview(bytes([value]) * (n * PS))])
            last[first:first + n] = value
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    src = targets.open_source(rbd_url)
    try:
        got = np.frombuffer(src.pread_meta(0, 64 * PS), np.uint8).reshape(64, PS)
    finally:
        src.close()
    assert (got == last[:, None]).all()


def test_nothing_committed(rbd_url, s3_url):
    for url, why in ((rbd_url, "no such image"), (s3_url, "no such snapshot")):
        with pytest.raises(targets.TargetError, match=why):
            open_snapshot(url)
    w = SnapshotWriter(rbd_url)
    w.reserve()  # the image exists now, but no save was committed
    w.abort()
    with pytest.raises(targets.TargetError, match="no committed vmsnap snapshot"):
        open_snapshot(rbd_url)


def _chunk_of_page(url: str, page: int) -> tuple[str, int, int]:
    """(chunk key, offset in the chunk, file offset) of pc.ram page `page`."""
    with open_snapshot(url) as s:
        foff = s.block("pc.ram").pages_offset + page * PS
    r = targets.remote(url)
    m = s3_objects._read_manifest(r)  # noqa: SLF001
    index, at = divmod(foff, m.chunk_size)
    return f"{m.prefix}{index * m.chunk_size:012x}", at, foff


def test_deleted_chunk_names_the_page(s3_url):
    write(s3_url, 8)
    key, _, _ = _chunk_of_page(s3_url, 3000)
    boto3.client("s3").delete_object(Bucket="vmsnap", Key=key)
    with open_snapshot(s3_url) as s, pytest.raises(SnapshotError) as err:
        s.verify()
    msg = str(err.value)
    assert "pc.ram' page at offset 0x" in msg and f"{key} is missing" in msg


def test_corrupt_chunk_names_the_page(s3_url):
    write(s3_url, 9)
    key, at, foff = _chunk_of_page(s3_url, 3000)  # 3000 % 3 == 0: a present page
    s3 = boto3.client("s3")
    body = bytearray(s3.get_object(Bucket="vmsnap", Key=key)["Body"].read())
    body[at + 100] ^= 0xFF
    s3.put_object(Bucket="vmsnap", Key=key, Body=bytes(body))
    with open_snapshot(s3_url) as s, pytest.raises(ChecksumMismatch) as err:
        s.verify()
    assert err.value.offset == 3000 * PS and err.value.file_offset == foff


def test_wrong_credentials(s3_url, monkeypatch):
    write(s3_url, 10)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setattr(s3_objects, "_client", None)
    try:
        for op in (open_snapshot, SnapshotWriter(s3_url).reserve):
            with pytest.raises(targets.TargetError, match="access denied"):
                op(s3_url) if op is open_snapshot else op()
    finally:
        s3_objects._client = None  # noqa: SLF001 - next test: the right credentials


def test_s3_missing_object_and_failures_without_a_cluster(monkeypatch):
    """exists() and the small-object reads share one translation of S3's answers: a missing
    object is False / None, any other failure one TargetError line naming the target, and
    an object larger than its kind may be is refused before its body is read."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    r = targets.remote("s3://bucket/vm.snap")
    closed = []

    class Body:
        def read(self):
            return b"hello"

        def close(self):
            closed.append(True)

    def stub(answer):
        def call(**kwargs):
            if isinstance(answer, Exception):
                raise answer
            return answer

        class Client:
            head_object = get_object = staticmethod(call)
        monkeypatch.setattr(s3_objects, "client", Client)

    for code in ("NoSuchKey", "404", "NotFound"):
        stub(ClientError({"Error": {"Code": code}}, "HeadObject"))
        assert s3_objects.exists(r) is False
        assert s3_objects.read_beside(r, ".hot", 100) is None
    stub({"ContentLength": 5, "Body": Body()})
    assert s3_objects.exists(r) and s3_objects.read_beside(r, ".hot", 100) == "hello"
    stub({"ContentLength": 101, "Body": Body()})
    with pytest.raises(targets.TargetError, match="too large for a .hot note"):
        s3_objects.read_beside(r, ".hot", 100)
    assert closed == [True]
    for failure, words in [(ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"),
                            "access denied"),
                           (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                            "Could not connect")]:
        stub(failure)
        for call in (lambda: s3_objects.exists(r), lambda: s3_objects.read_beside(r, ".x", 9)):
            with pytest.raises(targets.TargetError, match=f"s3://bucket/vm.snap: .*{words}"):
                call()
