"""`s3://BUCKET/KEY`: the snapshot file's bytes as fixed-size chunk objects plus a manifest.

Layout: the snapshot's address space is cut into CHUNK-byte pieces; piece i is the object
`KEY.chunks/<save id>/<i*CHUNK as 12 hex digits>` and is stored only if it holds a non-zero
byte (holes and zero pages cost nothing). Any page is one ranged GET: object = offset //
CHUNK, range = offset % CHUNK. The object `KEY` itself is the manifest (JSON: size, chunk
size, the save id's prefix, runs of stored chunks), written last: it is the commit. A crashed
or failed save leaves chunks under a save id no manifest names, which a later save of the
same KEY deletes (after ORPHAN_AGE); no multipart upload is ever started, so none can be
left incomplete. Concurrent saves to one KEY are not locked against each other: the last
commit wins.

Credentials and endpoint come from boto3's usual sources (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws); path-style addressing, client timeouts.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import numpy as np
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..errors import squash
from ..fileformat.bitmap import runs
from ..io.direct import IOEngineError
from ..io.vectored import Buffer
from . import Remote
from .base import RangeReader, TargetError, pieces

T = TypeVar("T")

log = logging.getLogger(__name__)

CHUNK = 4 << 20
#: Most chunks a manifest may claim (64 TiB of 4 MiB chunks): bounds what reading one allocates
MAX_CHUNKS = 1 << 24
#: dirty chunks kept in memory before the least recently written is uploaded
CACHED_CHUNKS = 16
THREADS = 8
#: chunk sets of other save ids older than this are garbage of crashed saves
ORPHAN_AGE = 15 * 60
MANIFEST_FORMAT = "vmsnap-s3-chunks/1"
MAX_MANIFEST = 64 << 20



@dataclass(frozen=True)
class Manifest:
    """A committed snapshot's manifest object, its JSON fields checked (_read_manifest)."""

    size: int
    chunk_size: int
    prefix: str  # of its chunk objects, under KEY.chunks/
    present: np.ndarray  # bool per chunk: stored (else a hole)

_client_lock = threading.Lock()
_client = None


def client() -> Any:  # a botocore S3 client (boto3 has no type hints)
    """One boto3 S3 client per process (thread-safe)."""
    global _client
    with _client_lock:
        if _client is None:
            cfg = Config(connect_timeout=10, read_timeout=60, max_pool_connections=2 * THREADS,
                         retries={"max_attempts": 3, "mode": "standard"},
                         s3={"addressing_style": "path"})
            _client = boto3.session.Session().client("s3", config=cfg)
        return _client


def _why(e: Exception) -> str:
    """A short reason for an S3 failure, with a hint for the usual mistakes."""
    if isinstance(e, NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"access denied ({code}): check the AWS credentials"
        if code == "NoSuchBucket":
            return "no such bucket"
        return f"{code}: {e.response.get('Error', {}).get('Message') or e}"
    return squash(str(e))


def _error(r: Remote | str, e: Exception, code: int = errno.EIO) -> TargetError:
    return TargetError(f"{r}: {_why(e)}", code)


def _missing(e: ClientError) -> bool:
    return e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


def _chunk_key(prefix: str, index: int) -> str:
    return f"{prefix}{index * CHUNK:012x}"


def _chunks_root(key: str) -> str:
    return f"{key}.chunks/"


def _unless_missing(r: Remote, request: Callable[[], T]) -> T | None:
    """`request()` (S3 calls about one object of `r`), or None if that object is missing;
    any other S3 failure is a TargetError."""
    try:
        return request()
    except ClientError as e:
        if _missing(e):
            return None
        raise _error(r, e) from None
    except BotoCoreError as e:
        raise _error(r, e) from None


def _get_small(r: Remote, key: str, limit: int, what: str) -> bytes | None:
    """The object `key` (None if there is none); TargetError if it is larger than `limit`
    bytes, which is too large for `what` it should be."""
    def get() -> bytes:
        obj = client().get_object(Bucket=r.container, Key=key)
        if obj.get("ContentLength", 0) > limit:
            obj["Body"].close()
            raise TargetError(f"{r}: object {key} is too large for {what}")
        data: bytes = obj["Body"].read()
        return data

    return _unless_missing(r, get)


def read_beside(r: Remote, suffix: str, limit: int) -> str | None:
    """`targets.read_beside`: the object KEY+SUFFIX."""
    body = _get_small(r, r.name + suffix, limit, f"a {suffix} note")
    return None if body is None else body.decode()


def write_beside(r: Remote, suffix: str, text: str) -> None:
    try:
        client().put_object(Bucket=r.container, Key=r.name + suffix, Body=text.encode())
    except (ClientError, BotoCoreError) as e:
        raise _error(r, e) from None


def _count(value: object) -> bool:
    """A non-negative JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_manifest(r: Remote) -> Manifest | None:
    """The manifest at `r`, validated; None if there is no object."""
    body = _get_small(r, r.name, MAX_MANIFEST, "a vmsnap manifest")
    if body is None:
        return None
    bad = TargetError(f"{r}: not a vmsnap snapshot manifest", errno.EINVAL)
    try:
        m = json.loads(body)
    except ValueError:
        raise bad from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise bad
    size, chunk, prefix, runs = m.get("size"), m.get("chunk_size"), m.get("prefix"), m.get("runs")
    if not isinstance(size, int) or not isinstance(chunk, int) or not _count(size) \
            or not _count(chunk) or chunk == 0 or chunk % RangeReader.BLOCK \
            or not isinstance(prefix, str) or not prefix.startswith(_chunks_root(r.name)) \
            or not isinstance(runs, list):
        raise bad
    nchunks = -(-size // chunk)
    if nchunks > MAX_CHUNKS:  # a claim no snapshot makes: refuse before allocating for it
        raise bad
    present = np.zeros(nchunks, dtype=bool)
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(map(_count, run))):
            raise bad
        first, count = (int(x) for x in run)
        if count == 0 or first + count > nchunks:
            raise bad
        present[first:first + count] = True
    return Manifest(size, chunk, prefix, present)


def exists(r: Remote) -> bool:
    return _unless_missing(r, lambda: client().head_object(Bucket=r.container,
                                                           Key=r.name)) is not None


class _Upload:
    """The latest upload of one chunk; `data` is kept until it is stored so a rewrite of
    the chunk can start from it instead of a GET."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.future: Future[None] | None = None


class Sink:
    """`PageSink` on S3: chunks gathered in memory, uploaded in parallel, manifest last."""

    direct = False
    fallback_reason: str | None = None

    def __init__(self, r: Remote) -> None:
        self.name = str(r)
        self._r = r
        self._s3 = client()
        try:  # fail before the VM is touched if the bucket or credentials are wrong
            self._s3.head_bucket(Bucket=r.container)
        except (ClientError, BotoCoreError) as e:
            raise _error(r, e) from None
        self._old = _read_manifest_or_none(r)
        self._prefix = f"{_chunks_root(r.name)}{time.time_ns():x}-{uuid.uuid4().hex[:8]}/"
        self._size = 0
        self._lock = threading.Condition()  # also signals a free upload slot or an error
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._last: dict[int, _Upload] = {}
        self._stored: set[int] = set()  # chunks whose latest content is non-zero
        self._busy = 0  # uploads submitted and not finished
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="vmsnap-s3")
        self._error: BaseException | None = None
        self._done = False

    # -- writes ------------------------------------------------------------------
    def write_at(self, offset: int, bufs: Sequence[Buffer]) -> int:
        total = 0
        for off, view in pieces(offset, bufs, CHUNK):
            index, at = divmod(off, CHUNK)
            with self._lock:
                self._raise()
                buf = self._chunk(index)
                buf[at:at + view.nbytes] = view
                self._size = max(self._size, off + view.nbytes)
                evicted = self._evict(CACHED_CHUNKS)
            self._upload(evicted)
            total += view.nbytes
        return total

    def _chunk(self, index: int) -> bytearray:
        """The dirty buffer of chunk `index` (lock held), starting from its last content."""
        buf = self._cache.get(index)
        if buf is not None:
            self._cache.move_to_end(index)
            return buf
        last = self._last.get(index)
        buf = bytearray(CHUNK)
        if last is not None and last.data is not None:
            buf[:len(last.data)] = last.data
        elif index in self._stored:  # rewritten after upload (live save): read it back
            try:
                old = self._s3.get_object(Bucket=self._r.container,
                                          Key=_chunk_key(self._prefix, index))["Body"].read()
            except (ClientError, BotoCoreError) as e:
                raise _error(self._r, e) from None
            buf[:len(old)] = old
        self._cache[index] = buf
        return buf

    def _evict(self, keep: int) -> list[tuple[int, _Upload, _Upload | None]]:
        """Take the oldest dirty chunks beyond `keep` (lock held) and register their uploads
        so a rewrite sees them at once."""
        out = []
        while len(self._cache) > keep:
            index, buf = self._cache.popitem(last=False)
            end = min(CHUNK, self._size - index * CHUNK)
            nonzero = np.frombuffer(buf, dtype=np.uint64).any()
            up = _Upload(bytes(buf[:end]) if nonzero else None)
            prev = self._last.get(index)
            if up.data is None and index not in self._stored and prev is None:
                continue  # all zero and never stored: nothing to do
            self._last[index] = up
            (self._stored.add if nonzero else self._stored.discard)(index)
            out.append((index, up, prev))
        return out

    def _upload(self, jobs: list[tuple[int, _Upload, _Upload | None]]) -> None:
        """Submit uploads, at most THREADS at a time; fails at once after an upload failed
        (a writer must not sit out the retries of the others)."""
        for index, up, prev in jobs:
            with self._lock:
                while self._busy >= THREADS and self._error is None:
                    self._lock.wait()
                self._raise()
                self._busy += 1
            up.future = self._pool.submit(self._put, index, up, prev)
            up.future.add_done_callback(self._uploaded)

    def _uploaded(self, _future: Future[None]) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def _put(self, index: int, up: _Upload, prev: _Upload | None) -> None:
        if prev is not None and prev.future is not None:
            wait([prev.future])  # two PUTs of one chunk land in order
        key = _chunk_key(self._prefix, index)
        try:
            if up.data is None:
                self._s3.delete_object(Bucket=self._r.container, Key=key)
            else:
                self._s3.put_object(Bucket=self._r.container, Key=key, Body=up.data)
        except (ClientError, BotoCoreError) as e:
            err = _error(self._r, e)
            with self._lock:
                self._error = self._error or err
                self._lock.notify_all()
            raise err from None
        with self._lock:
            if self._last.get(index) is up:
                up.data = None

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def pwrite_meta(self, offset: int, data: Buffer) -> int:
        return self.write_at(offset, [data])

    def truncate(self, length: int) -> None:
        with self._lock:
            self._size = length
            first_gone = -(-length // CHUNK)
            for index in [i for i in self._cache if i >= first_gone]:
                del self._cache[index]
            self._stored = {i for i in self._stored if i < first_gone}

    def _flush(self) -> None:
        with self._lock:
            jobs = self._evict(0)
        self._upload(jobs)
        futures = [u.future for u in list(self._last.values()) if u.future is not None]
        wait(futures)
        for f in futures:
            if (err := f.exception()) is not None:
                raise err
        self._raise()

    def commit(self) -> None:
        self._flush()
        nchunks = -(-self._size // CHUNK)
        present = np.zeros(nchunks, dtype=bool)
        present[sorted(self._stored)] = True
        manifest = {"format": MANIFEST_FORMAT, "size": self._size, "chunk_size": CHUNK,
                    "prefix": self._prefix, "created": time.time(),
                    "runs": [[int(a), int(b)] for a, b in runs(present)]}
        try:
            self._s3.put_object(Bucket=self._r.container, Key=self._r.name,
                                Body=json.dumps(manifest).encode(),
                                ContentType="application/json")
        except (ClientError, BotoCoreError) as e:
            raise _error(self._r, e) from None
        self._done = True
        self._pool.shutdown()
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete the replaced snapshot's chunks and chunks of crashed saves (best effort)."""
        old = self._old.prefix if self._old else None
        try:
            _delete_sets(self._r, keep=self._prefix, force=old)
        except (ClientError, BotoCoreError) as e:
            log.warning("%s: old chunks not deleted: %s", self.name, _why(e))

    def abort(self) -> None:
        """Quick: the caller's error report waits for it. Chunks are deleted only if the
        store works; otherwise (or if an upload still in flight lands later) a later save
        of this KEY collects them."""
        if self._done:
            return
        self._done = True
        with self._lock:
            self._cache.clear()
            store_failed = self._error is not None
            self._error = self._error or TargetError(f"{self.name}: save aborted")
            self._lock.notify_all()
        self._pool.shutdown(wait=not store_failed, cancel_futures=True)
        if store_failed:
            return
        try:
            _delete_sets(self._r, keep=None, force=self._prefix, only_force=True)
        except (ClientError, BotoCoreError) as e:
            # a later save of this KEY deletes them (ORPHAN_AGE)
            log.info("%s: chunks of the aborted save not deleted: %s", self.name, _why(e))


def _read_manifest_or_none(r: Remote) -> Manifest | None:
    try:
        return _read_manifest(r)
    except TargetError:
        return None  # not ours or damaged: it will be replaced, nothing of it to delete


def _delete_sets(r: Remote, *, keep: str | None, force: str | None,
                 only_force: bool = False) -> None:
    """Delete chunk sets under KEY.chunks/: the `force` one, and (unless `only_force`)
    every set other than `keep` whose newest object is older than ORPHAN_AGE."""
    s3 = client()
    root = _chunks_root(r.name)
    sets: dict[str, list[str]] = {}
    newest: dict[str, float] = {}
    pager = s3.get_paginator("list_objects_v2")
    for page in pager.paginate(Bucket=r.container, Prefix=force if only_force else root):
        for obj in page.get("Contents", []):
            rest = obj["Key"][len(root):]
            prefix = root + rest.split("/", 1)[0] + "/"
            sets.setdefault(prefix, []).append(obj["Key"])
            newest[prefix] = max(newest.get(prefix, 0), obj["LastModified"].timestamp())
    now = time.time()
    doomed = [k for p, keys in sets.items() if p != keep
              and (p == force or (not only_force and now - newest[p] > ORPHAN_AGE))
              for k in keys]
    for i in range(0, len(doomed), 1000):
        s3.delete_objects(Bucket=r.container, Delete={
            "Objects": [{"Key": k} for k in doomed[i:i + 1000]], "Quiet": True})


class Source(RangeReader):
    """`PageSource` on a committed manifest: parallel ranged GETs, holes read as zeros."""

    def __init__(self, r: Remote) -> None:
        m = _read_manifest(r)
        if m is None:
            raise TargetError(f"{r}: no such snapshot", errno.ENOENT)
        self._r = r
        self._chunk = m.chunk_size
        self._prefix = m.prefix
        self._present = m.present
        super().__init__(str(r), m.size, self._get, threads=THREADS)

    def allocated(self) -> int:
        return int(self._present.sum()) * self._chunk

    def _get(self, offset: int, view: memoryview) -> None:
        index, at = divmod(offset, self._chunk)
        if not self._present[index]:
            np.frombuffer(view, dtype=np.uint8)[:] = 0
            return
        key = f"{self._prefix}{index * self._chunk:012x}"
        try:
            body = client().get_object(Bucket=self._r.container, Key=key,
                                       Range=f"bytes={at}-{at + view.nbytes - 1}")["Body"]
            data = body.read()
        except ClientError as e:
            if _missing(e):
                raise IOEngineError(errno.ENOENT, f"{self.name}: chunk object {key} is "
                                    "missing") from None
            raise IOEngineError(errno.EIO, f"{self.name}: {_why(e)}") from None
        except BotoCoreError as e:
            raise IOEngineError(errno.EIO, f"{self.name}: {_why(e)}") from None
        if len(data) != view.nbytes:
            raise IOEngineError(errno.EIO, f"{self.name}: chunk object {key} is truncated")
        view[:] = data
