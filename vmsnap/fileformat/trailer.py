"""The vmsnap trailer, appended after the end of the QEMU stream (QEMU never reads it).

File tail::

    ... QEMU stream ... | zero padding to 4 KiB | body | commit record (64 bytes, EOF)

Body (at `body_offset` = stream_end rounded up to 4096; all integers little-endian)::

    0   8   magic b"VMSNAPT1"
    8   4   u32 format version (1)
    12  4   u32 length J of the JSON metadata
    16  J   JSON (UTF-8), see TrailerMetadata / the "blocks" and "ranges" keys
    ..      zero padding to a multiple of 8
    ..      per block in JSON "blocks" order: pages × u64 xxh3_64 of each present page,
            in bitmap order (ascending page number)

JSON keys: format_version, qemu_version, machine_type, command_line (list[str] | null),
created (ISO 8601 UTC), stream_end, checksum ("xxh3-64"), page_size,
page_checksums ("pending" in a file committed before its page checksums exist: QEMU wrote
the pages, `vmsnap seal` adds the tables later; absent otherwise), blocks [{"name", "pages"}],
ranges [{"start", "length", "xxh3" (16 hex digits)}] — one
range per non-page byte range of the stream (prefix + block records + bitmaps, tail) —
and, in files vmsnap saved, signature {"key_id", "hmac", "tables_sha256"}: HMAC-SHA256
under the saving host's key (see vmsnap.hostkey) of the domain string "vmsnap trailer hmac
v2", the length and bytes of the canonical JSON (sorted keys, no spaces) without
"signature", and the 32-byte SHA-256 of the checksum tables, whose hex is
"tables_sha256". It covers every metadata field and, through the digest and the xxh3
tables, every byte of the stream; re-sealing an altered file needs the key. Checking it
takes the metadata alone (a relaunch runs the stored command line without reading tables
that grow with RAM); the tables are refused, wherever they are used, unless their SHA-256
is the signed one. Files signed before (no "tables_sha256"): the domain string "... v1"
and the tables themselves instead of their digest; still checked, tables read first.

"table_chunks" (files vmsnap sealed since Dec 4 2026) {"entries": E, "xxh3": [16 hex digits
per chunk], "sha256": [64 hex digits per chunk] (in a signed file)}: each block's table cut
in chunks of E entries (its last one shorter), listed in body order, so that a table is
checked where and when a piece of it is used (a lazy restore's guest runs before the tables
of its RAM are read: what it needs first is the same whatever the RAM size), each against
the xxh3 (damage) and the signed SHA-256 (tamper) of its own chunk; the commit record then
holds the xxh3 of the body's head (magic to the tables), which the metadata (with the
stream ranges' checksums) is checked against without reading the tables. A file without
them, or whose commit record has no head checksum, is checked whole, as before.

This module runs no numpy until a function handles the tables as arrays (vmsnap.lazy_numpy:
a restore reads the metadata before numpy has loaded, see vmsnap.orchestration.early).

Commit record (last 64 bytes of the file, little-endian)::

    0   8   magic b"VMSNAPC1"
    8   4   u32 format version
    12  4   u32 reserved (0)
    16  8   u64 body offset
    24  8   u64 body length
    32  8   u64 xxh3_64 of the body
    40  8   u64 stream_end (end of the QEMU stream)
    48  8   u64 xxh3_64 of the body's head, up to its checksum tables (0: none, older files)
    56  8   u64 xxh3_64 of bytes 0..56 of this record
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import xxhash

from ..lazy_numpy import np
from ..stream.constants import MAPPED_RAM_FILE_OFFSET_ALIGNMENT, TARGET_PAGE_SIZE
from .errors import CorruptTrailer, NoCommitRecord, SnapshotError, UnsupportedVersion

if TYPE_CHECKING:
    from ..io.vectored import Buffer

FORMAT_VERSION = 1
BODY_MAGIC = b"VMSNAPT1"
COMMIT_MAGIC = b"VMSNAPC1"
COMMIT_SIZE = 64
TRAILER_ALIGN = 4096
CHECKSUM_ALGO = "xxh3-64"
PENDING = "pending"
_COMMIT = struct.Struct("<8sIIQQQQQ")  # + u64 self checksum
_BODY_HEAD = struct.Struct("<8sII")
assert _COMMIT.size == 56
#: Metadata JSON larger than this is refused (a real one is a few KiB plus 60 bytes per range).
MAX_METADATA = 16 << 20
#: Checksum table entries per chunk of "table_chunks" (1 MiB of table, 512 MiB of 4 KiB
#: pages: 16 chunks for 8 GiB of RAM, each read and checked in ~1 ms when first used)
CHUNK_ENTRIES = 1 << 17
#: Smallest page size any QEMU target uses: bounds the checksum tables by the stream's size.
MIN_PAGE_SIZE = 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")
_ALTERED = ("corrupt trailer: checksum tables differ from the signed ones (altered after the "
            "file was signed)")
_HMAC_DOMAIN_V1 = b"vmsnap trailer hmac v1\0"  # over the metadata and the tables
_HMAC_DOMAIN = b"vmsnap trailer hmac v2\0"  # over the metadata and the tables' SHA-256

#: A JSON object as json.loads returns it (validated field by field where it is read).
JsonObject = dict[str, Any]
T = TypeVar("T")


def xxh3(data: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(data)


def page_checksums(data: Buffer, page_size: int = TARGET_PAGE_SIZE) -> np.ndarray:
    """xxh3_64 of every page of `data` (n*page_size bytes) → uint64[n]."""
    mv = memoryview(data).cast("B")
    n = mv.nbytes // page_size
    f = xxhash.xxh3_64_intdigest
    return np.fromiter(
        (f(mv[i * page_size:(i + 1) * page_size]) for i in range(n)), dtype=np.uint64, count=n
    )


def utc_now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class TrailerMetadata:
    qemu_version: str | None = None
    machine_type: str | None = None
    command_line: list[str] | None = None
    created: str = field(default_factory=utc_now_iso)
    format_version: int = FORMAT_VERSION
    checksum: str = CHECKSUM_ALGO
    stream_end: int = 0
    page_size: int = TARGET_PAGE_SIZE
    extra: JsonObject = field(default_factory=dict)

    @property
    def domain_xml(self) -> str | None:
        """The libvirt domain XML of a file saved from a libvirt domain (extra "libvirt")."""
        lv = self.extra.get("libvirt")
        return lv["xml"] if isinstance(lv, dict) and isinstance(lv.get("xml"), str) else None

    @property
    def was_running(self) -> bool:
        """Whether the VM ran when it was saved (extra "run_state"; running if unset)."""
        return bool(self.extra.get("run_state", "running") == "running")

    def to_json(self) -> JsonObject:
        d: JsonObject = {
            "format_version": self.format_version,
            "qemu_version": self.qemu_version,
            "machine_type": self.machine_type,
            "command_line": self.command_line,
            "created": self.created,
            "stream_end": self.stream_end,
            "checksum": self.checksum,
            "page_size": self.page_size,
        }
        if self.extra:
            d["extra"] = self.extra
        return d


def key_id(key: bytes) -> str:
    """A public name of a host key (16 hex digits): tells "another host" from "altered"."""
    return hmac.new(key, b"vmsnap key id", hashlib.sha256).hexdigest()[:16]


def _canonical(md: JsonObject) -> bytes:
    return json.dumps(md, separators=(",", ":"), sort_keys=True).encode()


def _mac(key: bytes, js: bytes, tables: Buffer, domain: bytes = _HMAC_DOMAIN) -> str:
    """The HMAC of the metadata JSON `js` and `tables` (v2: their SHA-256; v1: the tables)."""
    mac = hmac.new(key, domain + struct.pack("<Q", len(js)) + js, hashlib.sha256)
    mac.update(tables)
    return mac.hexdigest()


@dataclass(frozen=True)
class Signature:
    """The trailer's host-key signature and the bytes it signs."""

    key_id: str
    mac: str
    metadata_json: bytes = field(repr=False)
    tables: Tables = field(repr=False)
    #: the signed SHA-256 of the tables (hex); None in a file signed before it was there
    tables_sha256: str | None = None

    def valid(self, key: bytes) -> bool:
        """Whether `key` made this signature: at once, from the metadata and the signed
        digest of the tables (the tables are refused where they are used unless they
        match it, see Tables); a file signed before the digest: after reading the tables."""
        if self.tables_sha256 is None:
            covered, domain = self.tables.data(), _HMAC_DOMAIN_V1
        else:
            covered, domain = bytes.fromhex(self.tables_sha256), _HMAC_DOMAIN
        return hmac.compare_digest(_mac(key, self.metadata_json, covered, domain), self.mac)


@dataclass(frozen=True)
class RangeChecksum:
    start: int
    length: int
    xxh3: int


@dataclass
class BlockChecksums:
    name: str
    table: np.ndarray  # uint64[pages], one per present page in bitmap order

    @property
    def pages(self) -> int:
        return len(self.table)


#: When Tables load: in a thread started at once, right away, or at the first use.
TablesWhen = Literal["thread", "now", "asked"]


class Tables:
    """The checksum tables of a trailer body: 8 bytes per present page, the part of the body
    that grows with RAM, which `load` reads and checks (the body's xxh3 covers them, and a
    signature's digest, if the file is signed).

    Opened from a file, they load in a thread started at once ("thread"), so that opening
    a file costs the same whatever its RAM size; whoever needs them (a page's check, the
    signature, the stream ranges, which the body's check vouches for) waits in `data()`,
    which raises what loading raised. "asked": loaded by the first `data()`."""

    def __init__(self, load: Callable[[], bytes], when: TablesWhen = "thread",
                 ended: Callable[[], None] | None = None) -> None:
        """`ended`: called once loading is over (loaded or failed), e.g. to close what
        `load` reads."""
        self._load_tables = load
        self._ended = ended
        self._lock = threading.Lock()
        self._loaded = False
        self._data = b""
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if when == "thread":
            self._thread = threading.Thread(target=self._load, name="vmsnap-tables",
                                            daemon=True)
            self._thread.start()
        elif when == "now":
            self._load()

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            try:
                self._data = self._load_tables()
            except BaseException as err:  # noqa: BLE001 - handed to whoever asks, in data()
                self._error = err
            finally:
                if self._ended is not None:
                    self._ended()
            self._loaded = True

    def wait(self) -> None:
        """Until a loading thread is done (loaded or failed)."""
        if self._thread is not None:
            self._thread.join()

    def data(self) -> bytes:
        """The tables' bytes, once loaded and checked."""
        self.wait()
        self._load()
        if self._error is not None:
            raise self._error
        return self._data


class ChunkedTables:
    """Checksum tables in chunks (see the module's docstring): each chunk read and checked
    against its own xxh3 and, in a signed file, its signed SHA-256 when an entry of it is
    first asked for, by whichever thread asks (the others asking for it wait), and kept."""

    def __init__(self, read: Callable[[int, int], bytes], pages: dict[str, int],
                 entries: int, xxh3s: list[int], sha256s: list[bytes] | None) -> None:
        """`read(offset, length)` reads the tables; `pages`: entries of each block, in
        body order; `entries` per chunk; one digest per chunk in each list."""
        self._read = read
        self._entries = entries
        self._xxh3 = xxh3s
        self._sha256 = sha256s
        #: block -> (its first chunk, its entries)
        self._blocks: dict[str, tuple[int, int]] = {}
        self._spans: list[tuple[int, int]] = []  # (offset in the tables, length) a chunk
        at = 0
        for name, count in pages.items():
            self._blocks[name] = (len(self._spans), count)
            self._spans += [((at + first) * 8, min(entries, count - first) * 8)
                            for first in range(0, count, entries)]
            at += count
        self._data: list[bytes | None] = [None] * len(self._spans)
        self._locks = [threading.Lock() for _ in self._spans]

    def entries(self, name: str, index: int, count: int) -> np.ndarray:
        """Entries `index`..`index+count` of block `name`'s table (its chunks checked)."""
        first, pages = self._blocks[name]
        if index < 0 or count < 0 or index + count > pages:
            raise SnapshotError(f"checksum entries {index}+{count} outside the table of "
                                f"{name!r} ({pages} entries)")
        e = self._entries
        parts = [np.frombuffer(self.chunk(first + j), "<u8", min(index + count - j * e, e)
                               - max(index - j * e, 0), max(index - j * e, 0) * 8)
                 for j in range(index // e, -(-(index + count) // e))]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, "<u8")

    def chunk(self, k: int) -> bytes:
        """Chunk `k`'s bytes, read and checked at the first call."""
        data = self._data[k]
        if data is None:
            with self._locks[k]:
                data = self._data[k]
                if data is None:
                    data = self._data[k] = self._load(k)
        return data

    def _load(self, k: int) -> bytes:
        at, length = self._spans[k]
        data = self._read(at, length)
        if len(data) != length:
            raise CorruptTrailer("corrupt trailer: body truncated")
        if xxh3(data) != self._xxh3[k]:
            raise CorruptTrailer("corrupt trailer: body checksum mismatch")
        if self._sha256 is not None and hashlib.sha256(data).digest() != self._sha256[k]:
            raise CorruptTrailer(_ALTERED)
        return data

    def all(self) -> bytes:
        """The whole tables, every chunk checked."""
        return b"".join(self.chunk(k) for k in range(len(self._spans)))


@dataclass
class Trailer:
    metadata: TrailerMetadata
    #: present pages (checksum table entries) of each block, in the body's order
    pages: dict[str, int]
    ranges: list[RangeChecksum]
    commit: CommitRecord
    tables: Tables = field(repr=False)
    signature: Signature | None = None
    #: False: committed before its page checksums exist (tables empty; `vmsnap seal`)
    sealed: bool = True
    #: the body up to its checksum tables (magic, version, metadata JSON, padding), as read
    head: bytes = field(default=b"", repr=False)
    #: the tables checked a chunk at a time, where used (None: whole, see Tables)
    chunks: ChunkedTables | None = field(default=None, repr=False)

    def check(self) -> None:
        """Raise CorruptTrailer if the body (its checksum tables included) is corrupt."""
        self.tables.data()

    def check_head(self) -> None:
        """Raise CorruptTrailer unless the metadata (with the stream ranges' checksums) is
        sound: checked when decoded against the commit record's checksum of the head, in a
        file with tables in chunks; else along with the whole body (waits for the tables)."""
        if self.chunks is None:
            self.tables.data()

    def entries(self, name: str, index: int, count: int) -> np.ndarray:
        """Entries `index`..`index+count` of the checksum table of block `name`, checked:
        the chunks that hold them, in a file with tables in chunks; else with all tables."""
        if self.chunks is not None:
            return self.chunks.entries(name, index, count)
        return self.block(name).table[index:index + count]

    @cached_property
    def blocks(self) -> list[BlockChecksums]:
        """Each block's checksum table (waits for the tables to be read and checked)."""
        data = self.tables.data()
        out, pos = [], 0
        for name, pages in self.pages.items():
            out.append(BlockChecksums(name, np.frombuffer(data, dtype="<u8", count=pages,
                                                          offset=pos)))
            pos += pages * 8
        return out

    def block(self, name: str) -> BlockChecksums:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def page_areas(self) -> dict[str, tuple[int, int]]:
        """(file offset, length) of each block's page area as the metadata alone tells, for
        what must be known before the stream is read (a mapped restore's launch command):
        the non-page ranges are, in block order, up to each block's bitmap end, then the
        tail; a page area starts at the next MiB boundary after its bitmap and ends where
        the next range starts. Empty if the ranges are not laid out so; the stream is the
        authority (whoever uses this compares it with the opened file's blocks)."""
        if len(self.ranges) != len(self.pages) + 1:
            return {}
        out = {}
        for name, before, after in zip(self.pages, self.ranges, self.ranges[1:], strict=False):
            start = -(-(before.start + before.length) // MAPPED_RAM_FILE_OFFSET_ALIGNMENT) \
                * MAPPED_RAM_FILE_OFFSET_ALIGNMENT
            if after.start <= start:
                return {}
            out[name] = (start, after.start - start)
        return out


@dataclass(frozen=True)
class CommitRecord:
    version: int
    body_offset: int
    body_length: int
    body_xxh3: int
    stream_end: int
    #: xxh3_64 of the body up to its checksum tables (0: not recorded, see table_chunks)
    head_xxh3: int = 0

    def pack(self) -> bytes:
        head = _COMMIT.pack(COMMIT_MAGIC, self.version, 0, self.body_offset, self.body_length,
                            self.body_xxh3, self.stream_end, self.head_xxh3)
        return head + struct.pack("<Q", xxh3(head))

    @classmethod
    def parse(cls, data: bytes, file_size: int) -> CommitRecord:
        """Decode the last 64 bytes of a file of `file_size` bytes."""
        if file_size < COMMIT_SIZE or len(data) != COMMIT_SIZE:
            raise NoCommitRecord("no vmsnap commit record (file too short)")
        magic, version, _res, boff, blen, bsum, send, hsum = _COMMIT.unpack(data[:56])
        if magic != COMMIT_MAGIC:
            raise NoCommitRecord("no vmsnap commit record at end of file")
        (own,) = struct.unpack("<Q", data[56:])
        if own != xxh3(data[:56]):
            raise CorruptTrailer("corrupt trailer: commit record checksum mismatch")
        if version != FORMAT_VERSION:
            raise UnsupportedVersion(
                f"unsupported vmsnap format version {version} (this build reads "
                f"{FORMAT_VERSION})"
            )
        rec_pos = file_size - COMMIT_SIZE
        if boff + blen != rec_pos:
            raise CorruptTrailer("corrupt trailer: body does not end at the commit record")
        if send > boff or boff != -(-send // TRAILER_ALIGN) * TRAILER_ALIGN:
            raise CorruptTrailer("corrupt trailer: body offset inconsistent with stream_end")
        if blen < _BODY_HEAD.size:
            raise CorruptTrailer("corrupt trailer: body too short")
        if blen > max_body_length(send):
            raise CorruptTrailer(f"corrupt trailer: body of {blen} bytes is larger than a "
                                 f"stream of {send} bytes can need")
        return cls(version, boff, blen, bsum, send, hsum)


def max_body_length(stream_end: int) -> int:
    """The largest body a stream of `stream_end` bytes can need: the metadata JSON and one
    8-byte checksum per page the stream can hold."""
    return _BODY_HEAD.size + MAX_METADATA + 8 + 8 * (stream_end // MIN_PAGE_SIZE)


def encode_trailer(
    stream_end: int,
    metadata: TrailerMetadata,
    blocks: Sequence[BlockChecksums],
    ranges: Sequence[RangeChecksum],
    key: bytes | None = None,
    sealed: bool = True,
) -> tuple[int, bytes]:
    """Return (file offset, bytes) of padding-free trailer: body + commit record, signed
    with `key` when given. `sealed=False`: the page checksums are still to come (`blocks`
    with empty tables).

    The caller writes it at the returned offset (stream_end rounded up to 4 KiB); the gap
    stream_end..offset must read as zeros.
    """
    md = metadata.to_json()
    md["stream_end"] = stream_end
    md["format_version"] = FORMAT_VERSION
    if not sealed:
        md["page_checksums"] = PENDING
    md["blocks"] = [{"name": b.name, "pages": int(b.pages)} for b in blocks]
    md["ranges"] = [
        {"start": r.start, "length": r.length, "xxh3": f"{r.xxh3:016x}"} for r in ranges
    ]
    parts = [np.ascontiguousarray(b.table, dtype="<u8").tobytes() for b in blocks]
    md["table_chunks"] = chunk_digests(parts, signed=key is not None)
    tables = b"".join(parts)
    if key is not None:
        digest = hashlib.sha256(tables).digest()
        md["signature"] = {"key_id": key_id(key), "hmac": _mac(key, _canonical(md), digest),
                           "tables_sha256": digest.hex()}
    js = _canonical(md)
    if len(js) > MAX_METADATA:
        raise SnapshotError(f"metadata JSON of {len(js)} bytes exceeds {MAX_METADATA}")
    head = _BODY_HEAD.pack(BODY_MAGIC, FORMAT_VERSION, len(js)) + js
    head += b"\0" * (-len(head) % 8)
    body = head + tables
    offset = -(-stream_end // TRAILER_ALIGN) * TRAILER_ALIGN
    commit = CommitRecord(FORMAT_VERSION, offset, len(body), xxh3(body), stream_end,
                          xxh3(head))
    return offset, body + commit.pack()


def chunk_digests(tables: Sequence[bytes], signed: bool,
                  entries: int | None = None) -> JsonObject:
    """The "table_chunks" of the blocks' checksum `tables`, `entries` (default
    CHUNK_ENTRIES) a chunk (see the module's docstring)."""
    entries = entries or CHUNK_ENTRIES
    size = entries * 8
    pieces = [memoryview(t)[at:at + size] for t in tables for at in range(0, len(t), size)]
    out: JsonObject = {"entries": entries, "xxh3": [f"{xxh3(p):016x}" for p in pieces]}
    if signed:
        out["sha256"] = [hashlib.sha256(p).hexdigest() for p in pieces]
    return out


def _req(d: JsonObject, key: str, kind: type[T], what: str = "") -> T:
    """`d[key]` if it is a `kind` (a bool is no int here), else CorruptTrailer."""
    value = d.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CorruptTrailer(f"corrupt trailer: metadata field {what}{key!r} missing or invalid")
    return value


def decode_body(body: bytes, commit: CommitRecord) -> Trailer:
    """Validate and decode the trailer body located by `commit` (all of it, at once)."""
    _check_body(body, b"", commit)
    tables_at = _tables_offset(body, commit)
    return _decode(body[:tables_at], commit,
                   lambda at, n: body[tables_at + at:tables_at + at + n], "now")


def _check_body(head: bytes, rest: bytes, commit: CommitRecord) -> None:
    """Check the length and xxh3 of a body read as `head` + `rest`."""
    if len(head) + len(rest) != commit.body_length:
        raise CorruptTrailer("corrupt trailer: body truncated")
    digest = xxhash.xxh3_64(head)
    digest.update(rest)
    if digest.intdigest() != commit.body_xxh3:
        raise CorruptTrailer("corrupt trailer: body checksum mismatch")


def _decode(head: bytes, commit: CommitRecord, read: Callable[[int, int], bytes],
            when: TablesWhen, loading: Tables | None = None,
            ended: Callable[[], None] | None = None) -> Trailer:
    """The trailer whose body starts with `head` (magic, version, metadata JSON, padding);
    `read(offset, length)` reads its checksum tables (offsets from their start). Tables
    in chunks (see the module's docstring) load a chunk at a time where used; whole ones
    load `when` told (see Tables), unless `loading` already loads them: those of this same
    body, read before (see read_body)."""
    if commit.head_xxh3 and xxh3(head) != commit.head_xxh3:
        raise CorruptTrailer("corrupt trailer: body checksum mismatch")
    md = _json(head)
    sig = _signature_fields(md)
    meta, sealed = _metadata(md, commit)
    length = commit.body_length - len(head)
    pages = _table_sizes(md, length)
    ranges = _ranges(md, commit.stream_end)
    if not sealed and any(pages.values()):
        raise CorruptTrailer("corrupt trailer: checksum tables in a file whose page "
                             "checksums are pending")
    digest = sig.get("tables_sha256") if sig else None
    chunks = _table_chunks(md, read, pages, digest is not None) if commit.head_xxh3 else None

    def load() -> bytes:
        tables = read(0, length)
        _check_body(head, tables, commit)
        if digest is not None and hashlib.sha256(tables).hexdigest() != digest:
            raise CorruptTrailer(_ALTERED)
        return tables

    if chunks is not None:
        tables = Tables(chunks.all, "asked")
    else:
        tables = loading or Tables(load, when, ended)
    signature = Signature(sig["key_id"], sig["hmac"], _signed_json(md), tables,
                          digest) if sig else None
    return Trailer(meta, pages, ranges, commit, tables, signature, sealed=sealed, head=head,
                   chunks=chunks)


def _table_chunks(md: JsonObject, read: Callable[[int, int], bytes], pages: dict[str, int],
                  signed: bool) -> ChunkedTables | None:
    """The tables in chunks that the "table_chunks" entry describes (its SHA-256 list
    required in a file `signed` with the tables' digest); None if there is none."""
    tc = md.get("table_chunks")
    if tc is None:
        return None
    entries = tc.get("entries") if isinstance(tc, dict) else None
    if not isinstance(entries, int) or isinstance(entries, bool) or entries <= 0:
        raise CorruptTrailer("corrupt trailer: metadata field 'table_chunks' invalid")
    count = sum(-(-n // entries) for n in pages.values())
    xxh3s, sha256s = tc.get("xxh3"), tc.get("sha256")
    if not _hex_list(xxh3s, 16, count) or (signed or sha256s is not None) \
            and not _hex_list(sha256s, 64, count):
        raise CorruptTrailer("corrupt trailer: metadata field 'table_chunks' invalid")
    return ChunkedTables(read, pages, entries, [int(h, 16) for h in xxh3s],
                         None if sha256s is None else [bytes.fromhex(h) for h in sha256s])


def _hex_list(value: object, digits: int, count: int) -> bool:
    """Whether `value` is a list of `count` strings of `digits` lowercase hex digits."""
    return isinstance(value, list) and len(value) == count and all(
        isinstance(h, str) and len(h) == digits and _HEX.fullmatch(h) for h in value)


def _tables_offset(start: bytes, commit: CommitRecord) -> int:
    """Check the fixed start of a body (magic, version, metadata length) and return where
    its checksum tables begin (after the metadata JSON and its padding)."""
    magic, version, jlen = _BODY_HEAD.unpack_from(start)
    if magic != BODY_MAGIC:
        raise CorruptTrailer("corrupt trailer: bad body magic")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"unsupported vmsnap trailer body version {version}")
    if jlen > MAX_METADATA:
        raise CorruptTrailer(f"corrupt trailer: metadata of {jlen} bytes exceeds "
                             f"{MAX_METADATA}")
    jend: int = _BODY_HEAD.size + jlen
    if jend > commit.body_length:
        raise CorruptTrailer("corrupt trailer: metadata length beyond body")
    if jend + (-jend % 8) > commit.body_length:
        raise CorruptTrailer("corrupt trailer: body length does not match its tables")
    return jend + (-jend % 8)


def _json(head: bytes) -> JsonObject:
    """The metadata JSON object of a body head (checked by _tables_offset)."""
    (jlen,) = struct.unpack_from("<I", head, 12)
    try:
        md = json.loads(head[_BODY_HEAD.size:_BODY_HEAD.size + jlen].decode())
    except (ValueError, RecursionError):
        raise CorruptTrailer("corrupt trailer: metadata is not valid JSON") from None
    if not isinstance(md, dict):
        raise CorruptTrailer("corrupt trailer: metadata is not a JSON object")
    return md


def _metadata(md: JsonObject, commit: CommitRecord) -> tuple[TrailerMetadata, bool]:
    """The metadata fields, each checked, and whether the page checksums are there (not
    "pending")."""
    if _req(md, "format_version", int) != FORMAT_VERSION:
        raise UnsupportedVersion(f"unsupported vmsnap metadata version {md['format_version']}")
    if _req(md, "checksum", str) != CHECKSUM_ALGO:
        raise CorruptTrailer(f"corrupt trailer: unknown checksum algorithm {md['checksum']!r}")
    if _req(md, "stream_end", int) != commit.stream_end:
        raise CorruptTrailer("corrupt trailer: stream_end differs from commit record")
    cmd = md.get("command_line")
    if cmd is not None and not (isinstance(cmd, list) and all(isinstance(s, str) for s in cmd)):
        raise CorruptTrailer("corrupt trailer: command_line must be a list of strings or null")
    for k in ("qemu_version", "machine_type"):
        if md.get(k) is not None and not isinstance(md[k], str):
            raise CorruptTrailer(f"corrupt trailer: metadata field {k!r} invalid")
    page_size = _req(md, "page_size", int)
    pending = md.get("page_checksums", None)
    if pending not in (None, PENDING):
        raise CorruptTrailer("corrupt trailer: metadata field 'page_checksums' invalid")
    created = _req(md, "created", str)
    extra = md.get("extra", {})
    if not isinstance(extra, dict):
        raise CorruptTrailer("corrupt trailer: metadata field 'extra' invalid")
    meta = TrailerMetadata(
        qemu_version=md.get("qemu_version"), machine_type=md.get("machine_type"),
        command_line=cmd, created=created, stream_end=commit.stream_end,
        page_size=page_size, extra=extra,
    )
    return meta, pending is None


def _table_sizes(md: JsonObject, length: int) -> dict[str, int]:
    """The "blocks" entries: each block's checksum table size in pages; the tables fill the
    `length` bytes after the metadata."""
    pages: dict[str, int] = {}
    for i, bd in enumerate(_req(md, "blocks", list)):
        if not isinstance(bd, dict):
            raise CorruptTrailer("corrupt trailer: block entry is not an object")
        name = _req(bd, "name", str, f"blocks[{i}].")
        count = _req(bd, "pages", int, f"blocks[{i}].")
        if name in pages or count < 0:
            raise CorruptTrailer(f"corrupt trailer: bad block entry {name!r}")
        pages[name] = count
        if 8 * sum(pages.values()) > length:
            raise CorruptTrailer(f"corrupt trailer: checksum table of {name!r} beyond body")
    if 8 * sum(pages.values()) != length:
        raise CorruptTrailer("corrupt trailer: body length does not match its tables")
    return pages


def _ranges(md: JsonObject, stream_end: int) -> list[RangeChecksum]:
    """The "ranges" entries: byte ranges inside the stream, each with a 16-digit xxh3."""
    ranges = []
    for i, rd in enumerate(_req(md, "ranges", list)):
        if not isinstance(rd, dict):
            raise CorruptTrailer("corrupt trailer: range entry is not an object")
        start = _req(rd, "start", int, f"ranges[{i}].")
        length = _req(rd, "length", int, f"ranges[{i}].")
        hx = _req(rd, "xxh3", str, f"ranges[{i}].")
        if start < 0 or length < 0 or start + length > stream_end:
            raise CorruptTrailer(f"corrupt trailer: range {i} outside the stream")
        try:
            if len(hx) != 16:
                raise ValueError
            value = int(hx, 16)
        except ValueError:
            raise CorruptTrailer(f"corrupt trailer: range {i} checksum invalid") from None
        ranges.append(RangeChecksum(start, length, value))
    return ranges


def _signature_fields(md: JsonObject) -> dict[str, str] | None:
    """Take the signature out of the parsed metadata `md` (checked); None if it has none."""
    sig = md.pop("signature", None)
    if sig is None:
        return None
    digest = sig.get("tables_sha256") if isinstance(sig, dict) else None
    if not (isinstance(sig, dict) and isinstance(sig.get("key_id"), str)
            and isinstance(sig.get("hmac"), str) and len(sig["hmac"]) == 64
            and (digest is None or isinstance(digest, str) and _HEX64.fullmatch(digest))):
        raise CorruptTrailer("corrupt trailer: metadata field 'signature' invalid")
    return sig


def _signed_json(md: JsonObject) -> bytes:
    """The canonical JSON a signature covers (`md` without its signature)."""
    try:
        return _canonical(md)
    except (ValueError, RecursionError):
        raise CorruptTrailer("corrupt trailer: metadata cannot be signed") from None


def read_commit(pread: Callable[[int, int], bytes], file_size: int) -> CommitRecord:
    """Read and validate the commit record of a file through `pread(offset, length)`.

    Raises NoCommitRecord (no vmsnap record: caller decides native vs incomplete),
    CorruptTrailer / UnsupportedVersion otherwise.
    """
    if file_size < COMMIT_SIZE:
        raise NoCommitRecord("no vmsnap commit record (file too short)")
    return CommitRecord.parse(pread(file_size - COMMIT_SIZE, COMMIT_SIZE), file_size)


def read_body(pread: Callable[[int, int], bytes], commit: CommitRecord,
              present_pages: int | None = None, *, tables: TablesWhen | None = None,
              ended: Callable[[], None] | None = None, reuse: Trailer | None = None
              ) -> Trailer:
    """Read and decode the body `commit` locates; with `present_pages` (known from the
    bitmaps), a body longer than their checksum tables and the metadata can need is refused
    before it is read. `tables`: read only the metadata now, and the checksum tables (with
    the check of the body they complete) in a thread or when first asked for, see Tables
    (`ended`: called once they are loaded or failed, if they load at all); None: the whole
    body, checked, at once. `reuse`: a trailer read from this same file before, whose
    tables are loading: taken over if its commit record and body head are this one's (its
    tables are then checked against this very head and commit, as ours would be)."""
    if present_pages is not None and commit.body_length > _BODY_HEAD.size + MAX_METADATA + 8 \
            + 8 * present_pages:
        raise CorruptTrailer(f"corrupt trailer: body of {commit.body_length} bytes is larger "
                             f"than the metadata and checksums of {present_pages} present "
                             "pages can need")
    if tables is None:
        return decode_body(pread(commit.body_offset, commit.body_length), commit)
    start = pread(commit.body_offset, _BODY_HEAD.size)
    tables_at = _tables_offset(start, commit)
    head = start + pread(commit.body_offset + len(start), tables_at - len(start))
    loading = reuse.tables if reuse is not None and reuse.commit == commit \
        and reuse.head == head else None
    return _decode(head, commit, lambda at, n: pread(commit.body_offset + tables_at + at, n),
                   tables, loading, ended)


def read_trailer(pread: Callable[[int, int], bytes], file_size: int) -> Trailer:
    """Read and validate the whole trailer of a file (read_commit, then read_body)."""
    return read_body(pread, read_commit(pread, file_size))


def decode_trailer_bytes(data: bytes) -> Trailer:
    """Decode a trailer from a whole in-memory file image (used by tests/fuzzing)."""
    def pread(off: int, n: int) -> bytes:
        if off < 0 or off + n > len(data):
            raise SnapshotError("read beyond end of file")
        return data[off:off + n]
    return read_trailer(pread, len(data))
