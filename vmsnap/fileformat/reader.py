"""Open and verify a snapshot file (vmsnap with trailer, or QEMU-native mapped-ram)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import xxhash

from ..errors import one_line
from ..io.aligned import PAGE_SIZE, AlignedBuffer
from ..io.direct import DirectFile, IOEngineError
from ..io.vectored import Buffer
from ..lazy_numpy import np
from ..stream.events import MappedRamHeader, RamBlock, bitmap_size
from ..targets import PageSource, open_source, remote
from . import journal
from .bitmap import contiguous_runs, count_set, runs, unpack_bitmap
from .errors import (
    ChecksumMismatch,
    CorruptTrailer,
    IncompleteSnapshot,
    NoCommitRecord,
    SnapshotError,
)
from .prefix import StreamPrefix, StreamScan
from .trailer import (
    CommitRecord,
    Trailer,
    TrailerMetadata,
    page_checksums,
    read_body,
    read_commit,
)

log = logging.getLogger(__name__)

#: Tail (device state) larger than this is refused (sanity bound).
MAX_TAIL = 1 << 30
#: Pages any file may index whatever its size on disk (1 TiB of 4 KiB pages, 256 MiB of
#: index): a file whose zero bitmap words became holes (cp --sparse) stays readable.
INDEX_FLOOR = 1 << 28
#: Stream ranges are checked in pieces of this size (a range is as long as the file says).
RANGE_CHUNK = 8 << 20
#: iter_pages(warm=True): bytes read ahead of the reader (posix_fadvise WILLNEED)
WARM_AHEAD = 64 << 20
#: Pages per count of BlockInfo.table_index (16 MiB of 4 KiB pages)
INDEX_STRIDE = 4096


@dataclass
class BlockInfo:
    name: str
    used_length: int
    idstr_offset: int
    header_offset: int
    header: MappedRamHeader
    bitmap: bytes = field(repr=False)  # of present pages, as in the file

    @property
    def bitmap_offset(self) -> int:
        return self.header.bitmap_offset

    @property
    def pages_offset(self) -> int:
        return self.header.pages_offset

    @property
    def page_size(self) -> int:
        return self.header.page_size

    @property
    def npages(self) -> int:
        return self.used_length // self.header.page_size

    @cached_property
    def present(self) -> np.ndarray:
        """bool[npages], unpacked at the first use (2 MiB at 8 GiB of RAM: ~1 ms, after a
        lazy restore's guest runs, in the pushers or the check that need it)."""
        return unpack_bitmap(self.bitmap, self.npages)

    @cached_property
    def present_count(self) -> int:
        return count_set(self.bitmap, self.npages)

    @cached_property
    def _marks(self) -> np.ndarray:
        """Present pages before every INDEX_STRIDE-th page."""
        whole = len(self.present) // INDEX_STRIDE * INDEX_STRIDE
        counts = np.count_nonzero(self.present[:whole].reshape(-1, INDEX_STRIDE), axis=1)
        return np.concatenate(([0], np.cumsum(counts), [self.present_count]))

    def table_index(self, page: int) -> int:
        """The entry of present page `page` in the block's checksum table: the number of
        present pages before it (an index of one count per INDEX_STRIDE pages, made on first
        use, and a count inside the stride: no per-page index to build before a restore)."""
        mark = page // INDEX_STRIDE
        return int(self._marks[mark]) + int(np.count_nonzero(
            self.present[mark * INDEX_STRIDE:page]))


@dataclass(frozen=True)
class PageRun:
    """`count` present pages of `block` from page `first`; `index` is the first one's entry
    in the block's checksum table."""

    block: BlockInfo
    first: int
    count: int
    index: int


@dataclass
class VerifyResult:
    pages: int
    bytes: int
    ranges: int


class Snapshot:
    """An open snapshot file. `trailer`/`metadata` are None for QEMU-native files."""

    def __init__(self, path: str, file: PageSource, size: int, prefix: StreamPrefix,
                 header_bytes: bytes, blocks: list[BlockInfo], tail_offset: int, tail: bytes,
                 trailer: Trailer | None) -> None:
        self.path = path
        self._file = file
        self.file_size = size
        self.stream = prefix
        self.header_bytes = header_bytes  # header + configuration + RAM START up to blocks
        self.blocks = blocks
        self.tail_offset = tail_offset
        self.tail = tail  # EOS, footer, ..., device state, EOF, vmdesc
        self.trailer = trailer
        self.stream_end = tail_offset + len(tail)

    @property
    def native(self) -> bool:
        return self.trailer is None

    @property
    def pages_checked(self) -> bool:
        """Whether the trailer has every page's checksum (False: QEMU-native, or pending)."""
        return self.trailer is not None and self.trailer.sealed

    @property
    def metadata(self) -> TrailerMetadata | None:
        return self.trailer.metadata if self.trailer else None

    @property
    def machine_type(self) -> str:
        return self.stream.machine_type

    @property
    def direct(self) -> bool:
        return self._file.direct

    def block(self, name: str) -> BlockInfo:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def _b(self, block: str | BlockInfo) -> BlockInfo:
        return block if isinstance(block, BlockInfo) else self.block(block)

    def present_runs(self, block: str | BlockInfo, max_pages: int | None = None) -> np.ndarray:
        """(first_page, count) runs of present pages, shape (n, 2)."""
        return runs(self._b(block).present, max_pages)

    def page_runs(self, max_bytes: int) -> list[PageRun]:
        """Every run of present pages of every block, none longer than `max_bytes`."""
        out = []
        for b in self.blocks:
            index = np.concatenate(([0], np.cumsum(b.present)))
            out += [PageRun(b, int(first), int(count), int(index[first]))
                    for first, count in self.present_runs(b, max_bytes // b.page_size)]
        return out

    def prefetch_pages(self, block: BlockInfo, pages: np.ndarray) -> None:
        """Start reading `pages` (ascending) of a local file into the page cache, all at
        once, for read_pages(cached=True); a remote store reads nothing ahead here."""
        for i, count in contiguous_runs(pages):
            self._prefetch_run(block, int(pages[i]), int(count))

    def _prefetch_run(self, block: BlockInfo, first_page: int, count: int) -> None:
        if isinstance(self._file, DirectFile):
            ps = block.page_size
            self._file.prefetch(block.pages_offset + first_page * ps, count * ps)

    def read_pages(self, block: str | BlockInfo, first_page: int, count: int,
                   into: AlignedBuffer | Buffer | None = None, *, urgent: bool = False,
                   cached: bool = False, keep: bool = False) -> memoryview:
        """Read `count` pages starting at page `first_page` (O_DIRECT when `into` is an
        aligned buffer; `urgent`: someone waits on them, see PageSource.read_urgent;
        `cached`: a local file's pages through the page cache, after prefetch_pages, and
        left there with `keep`). Returns a memoryview of exactly count*page_size bytes."""
        b = self._b(block)
        if first_page < 0 or count < 0 or first_page + count > b.npages:
            raise SnapshotError(f"pages {first_page}+{count} outside block {b.name!r}")
        n = count * b.page_size
        if into is None:
            into = AlignedBuffer(max(n, 1))
        mv = (into.view if isinstance(into, AlignedBuffer) else memoryview(into)).cast("B")
        if mv.nbytes < n:
            raise ValueError(f"buffer too small: {mv.nbytes} < {n}")
        mv = mv[:n]

        def read(at: int, into: memoryview) -> None:
            if cached and isinstance(self._file, DirectFile):
                self._file.read_cached(at, [into], keep=keep)
            else:
                (self._file.read_urgent if urgent else self._file.read_into)(at, [into])

        if n:
            try:
                read(b.pages_offset + first_page * b.page_size, mv)
            except OSError as err:
                log.debug("read of %s pages %d+%d failed (%s): again page by page", b.name,
                          first_page, count, err)
                _reread(b, first_page, mv, read)
        return mv

    def check_pages(self, block: BlockInfo, first: int, count: int, data: memoryview,
                    index: int) -> None:
        """Compare pages [first, first+count) of `block` (bytes in `data`) with the trailer's
        table, whose entry for `first` is at `index`. Raises ChecksumMismatch naming the page."""
        if self.trailer is None or not self.pages_checked:
            return
        ps = block.page_size
        try:
            want = self.trailer.entries(block.name, index, count)
        except CorruptTrailer:
            raise
        except (OSError, SnapshotError) as err:  # a table chunk read now, after the open
            raise SnapshotError(
                f"cannot read block {block.name!r} page at offset {first * ps:#x} (file "
                f"offset {block.pages_offset + first * ps:#x}): its checksum: {one_line(err)}"
            ) from None
        got = page_checksums(data[:count * ps], ps)
        bad = np.flatnonzero(got != want)
        if len(bad):
            page = first + int(bad[0])
            raise ChecksumMismatch(
                f"page corrupt: block {block.name!r} offset {page * ps:#x} "
                f"(file offset {block.pages_offset + page * ps:#x})",
                block=block.name, offset=page * ps, file_offset=block.pages_offset + page * ps)

    def read_meta(self, offset: int, length: int) -> bytes:
        """Bytes of the stream (not page data), read through the buffered descriptor."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise SnapshotError(f"read {offset:#x}+{length:#x} beyond end of file")
        return self._file.pread_meta(offset, length)

    def check_stream_ranges(self) -> None:
        """Check every non-page byte range (header, bitmaps, device state) against the trailer
        (once the metadata that lists them checked out: see Trailer.check_head)."""
        if self.trailer is not None:
            self.trailer.check_head()
        for r in self.trailer.ranges if self.trailer else ():
            digest = xxhash.xxh3_64()
            for pos in range(r.start, r.start + r.length, RANGE_CHUNK):
                digest.update(self._file.pread_meta(pos, min(RANGE_CHUNK,
                                                             r.start + r.length - pos)))
            if digest.intdigest() != r.xxh3:
                raise ChecksumMismatch(
                    f"stream bytes {r.start:#x}..{r.start + r.length:#x} corrupt "
                    "(header/bitmap/device state)", file_offset=r.start)

    def iter_pages(self, chunk_bytes: int = 8 << 20, verify: bool = True,
                   skip: Container[str] = (), warm: bool = False,
                   ) -> Iterator[tuple[BlockInfo, int, int, memoryview]]:
        """Yield (block, first_page, count, data) for every run of present pages, in file
        order, read with O_DIRECT into two aligned buffers (the next run is read while the
        caller works on this one). `data` is valid until the next item. With `verify`, each
        run is checked against the trailer before it is yielded. Blocks named in `skip`
        are left out. `warm`: read through the page cache instead, WARM_AHEAD bytes ahead
        (readahead: many reads in flight), and leave the pages there (a file a guest maps:
        its first touches of them then find them in memory)."""
        jobs = [(b, int(first), int(count))
                for b in self.blocks if b.name not in skip
                for first, count in self.present_runs(b, max(chunk_bytes // b.page_size, 1))]
        index = {b.name: 0 for b in self.blocks}
        bufs = [AlignedBuffer(chunk_bytes), AlignedBuffer(chunk_bytes)]
        ahead = max(WARM_AHEAD // chunk_bytes, 1) if warm else 0
        prefetched = 0

        def read(k: int) -> memoryview:
            nonlocal prefetched
            for job in jobs[max(prefetched, k + 1):k + 1 + ahead]:
                self._prefetch_run(*job)
            prefetched = max(prefetched, k + 1 + ahead)
            return self.read_pages(*jobs[k], bufs[k % 2], cached=warm, keep=warm)

        with ThreadPoolExecutor(1, thread_name_prefix="vmsnap-read") as ex:
            fut = ex.submit(read, 0) if jobs else None
            try:
                for k, (b, first, count) in enumerate(jobs):
                    assert fut is not None  # submitted for job k before
                    mv = fut.result()
                    if k + 1 < len(jobs):
                        fut = ex.submit(read, k + 1)
                    if verify:
                        self.check_pages(b, first, count, mv, index[b.name])
                    index[b.name] += count
                    yield b, first, count, mv
            finally:
                if fut is not None:
                    fut.cancel()
                    try:
                        fut.result()
                    except BaseException:  # noqa: BLE001 - already failing or cancelled
                        pass
                for buf in bufs:
                    buf.close()

    def verify(self, progress: Callable[[int, int], None] | None = None,
               chunk_bytes: int = 8 << 20, skip: Container[str] = (),
               warm: bool = False, stop: threading.Event | None = None) -> VerifyResult:
        """Check every present page (of the blocks not in `skip`) and every non-page stream
        range against the trailer. Raises ChecksumMismatch naming the first bad page (block
        + offset). `progress(done_bytes, total_bytes)` is called after each chunk. `warm`:
        the pages are read into the page cache and left there (iter_pages). `stop`: once
        set, the check ends after the chunk at hand (a check in the background whose
        guest is gone, or interrupted); the result counts the pages it checked."""
        if self.trailer is None:
            raise SnapshotError("QEMU-native file has no checksums to verify")
        if not self.trailer.sealed:
            raise SnapshotError(f"page checksums of {self.path} are pending (QEMU wrote the "
                                "pages): run `vmsnap seal` on it first")
        self.check_stream_ranges()
        total = sum(b.present_count * b.page_size for b in self.blocks if b.name not in skip)
        done = pages = 0
        for b, _first, count, _data in self.iter_pages(chunk_bytes, skip=skip, warm=warm):
            done += count * b.page_size
            pages += count
            if progress:
                progress(done, total)
            if stop is not None and stop.is_set():
                break
        return VerifyResult(pages, done, len(self.trailer.ranges))

    def reopen(self, flags: int) -> int:
        """A new descriptor on this very file (the one checked, whatever its path names by
        now), for a reader outside vmsnap such as QEMU. A local file only."""
        if not isinstance(self._file, DirectFile):
            raise SnapshotError(f"{self.path} is not a local file")
        return self._file.reopen(flags)

    def is_file(self, dev_ino: tuple[int, int]) -> bool:
        """Whether this is the local file whose (st_dev, st_ino) is `dev_ino`."""
        return isinstance(self._file, DirectFile) and _identity(self._file) == dev_ino

    def close(self) -> None:
        if self.trailer is not None:
            self.trailer.tables.wait()  # it reads the file
        self._file.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reread(b: BlockInfo, first: int, mv: memoryview,
            read: Callable[[int, memoryview], None]) -> None:
    """Read the pages of `mv` (from page `first` of `b`), whose read together failed (an I/O
    error, the file cut short), one at a time: the first that fails again is named, by its
    block, its offset in it and its file offset; if none does, they are read after all."""
    ps = b.page_size
    for i in range(mv.nbytes // ps):
        at = b.pages_offset + (first + i) * ps
        try:
            read(at, mv[i * ps:(i + 1) * ps])
        except OSError as err:
            raise SnapshotError(f"cannot read block {b.name!r} page at offset "
                                f"{(first + i) * ps:#x} (file offset {at:#x}): "
                                f"{err.strerror or err}") from None


def open_snapshot(path: str | os.PathLike[str], *, direct: bool = True,
                  allow_incomplete: bool = False,
                  loading: tuple[tuple[int, int], Trailer] | None = None) -> Snapshot:
    """Open a snapshot (a file, `rbd:POOL/IMAGE` or `s3://BUCKET/KEY`). Raises SnapshotError
    (one-line message) if it is malformed, IncompleteSnapshot if it has no commit record
    and the QEMU stream is unfinished, CorruptTrailer/UnsupportedVersion for a damaged or
    newer vmsnap trailer. `loading`: (st_dev, st_ino) of a file and a trailer read from it
    before, whose checksum tables are loading (orchestration.early): taken over if this is
    that file and its trailer the same (trailer.read_body), instead of reading them again."""
    path = os.fspath(path)
    f = open_source(path, direct=direct)
    reuse = loading[1] if loading is not None and isinstance(f, DirectFile) \
        and _identity(f) == loading[0] else None
    try:
        try:
            snap = _open(path, f, allow_incomplete, reuse)
        except SnapshotError:
            if remote(path) is not None or not os.path.lexists(journal.journal_path(path)):
                raise
            snap = _open(path, f, allow_incomplete, reuse)  # a seal began while we read
    except BaseException:
        f.close()
        raise
    log.debug("opened %s: %s file, %d RAM blocks, %s I/O", path,
              "QEMU-native" if snap.native else "vmsnap", len(snap.blocks),
              "O_DIRECT" if f.direct else f"buffered ({f.fallback_reason})")
    return snap


def _identity(f: DirectFile) -> tuple[int, int]:
    st = os.fstat(f.meta_fd)
    return st.st_dev, st.st_ino


def _open(path: str, f: PageSource, allow_incomplete: bool, reuse: Trailer | None) -> Snapshot:
    size = f.size()

    def read(off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > size:
            raise SnapshotError(f"read {off:#x}+{n:#x} beyond end of file ({size:#x})")
        try:
            return f.pread_meta(off, n)
        except IOEngineError as e:
            raise SnapshotError(f"file truncated: {e.strerror}") from None

    pread, size = _as_sealed(path, read, size)
    commit: CommitRecord | None
    try:
        commit = read_commit(pread, size)
        stream_end = commit.stream_end
    except NoCommitRecord:
        commit = None
        stream_end = size
    scan = StreamScan(pread, stream_end)
    prefix = scan.prefix
    tail_len = stream_end - prefix.tail_offset
    if tail_len < 0 or tail_len > MAX_TAIL:
        raise SnapshotError("stream tail length out of range")
    tail = pread(prefix.tail_offset, tail_len)
    if commit is None and not allow_incomplete:
        problem = scan.tail_problem(tail)
        if problem is not None:
            raise IncompleteSnapshot(
                "incomplete snapshot: no vmsnap commit record and the QEMU stream is "
                f"unfinished: {problem}")
    _check_index_size(f, prefix)
    blocks = []
    for rb in prefix.blocks:
        header_offset, hdr = _mapped_header(rb)
        npages = rb.used_length // hdr.page_size
        blocks.append(BlockInfo(rb.name, rb.used_length, rb.stream_offset, header_offset,
                                hdr, pread(hdr.bitmap_offset, bitmap_size(npages))))
    trailer = None
    if commit is not None:
        trailer = read_body(pread, commit, sum(b.present_count for b in blocks),
                            tables="thread", reuse=reuse)  # see Tables
    try:
        if trailer is not None:
            _check_tables(trailer, blocks)
        header_bytes = pread(0, prefix.first_block_offset)
    except BaseException:
        if trailer is not None:
            trailer.tables.wait()  # it reads the file, which the caller closes
        raise
    return Snapshot(path, f, size, prefix, header_bytes, blocks, prefix.tail_offset, tail,
                    trailer)


def _check_tables(trailer: Trailer, blocks: list[BlockInfo]) -> None:
    """The trailer's checksum tables must be those of the stream's blocks, one entry per
    present page."""
    if list(trailer.pages) != [b.name for b in blocks]:
        raise SnapshotError("trailer block list does not match the stream's RAM blocks")
    for b in blocks if trailer.sealed else ():
        if trailer.pages[b.name] != b.present_count:
            raise SnapshotError(
                f"trailer checksum table of {b.name!r} has {trailer.pages[b.name]} "
                f"entries for {b.present_count} present pages")


def _as_sealed(path: str, pread: journal.Pread, size: int) -> tuple[journal.Pread, int]:
    """The file as an interrupted `vmsnap seal` leaves it, when its own trailer does not read
    and a seal journal is there (see vmsnap.fileformat.journal)."""
    if remote(path) is not None or not os.path.lexists(journal.journal_path(path)):
        return pread, size
    try:
        read_body(pread, read_commit(pread, size))
        return pread, size
    except NoCommitRecord:
        pass  # QEMU-native, or a trailer being written
    except SnapshotError:
        pass  # a trailer being replaced
    sealed = journal.overlay(path, pread, size)
    if sealed is None:
        return pread, size
    log.debug("%s: trailer from the seal journal (an interrupted seal)", path)
    return sealed


def _mapped_header(rb: RamBlock) -> tuple[int, MappedRamHeader]:
    """(file offset, value) of the mapped-ram header of a block StreamScan decoded (every
    block of a file has one)."""
    if rb.mapped_ram is None or rb.header_offset is None:
        raise SnapshotError(f"RAM block {rb.name!r} has no mapped-ram header")
    return rb.header_offset, rb.mapped_ram


def _check_index_size(f: PageSource, prefix: StreamPrefix) -> None:
    """Refuse RAM blocks whose per-page index (one byte per page in memory) is larger than
    the file can describe: a file holds its bitmaps (one bit per page) on disk, so a claim
    of more than 8 pages per allocated byte is a sparse file lying about its size."""
    pages = sum(b.used_length // _mapped_header(b)[1].page_size for b in prefix.blocks)
    allocated = f.allocated()
    if pages > max(INDEX_FLOOR, 8 * allocated):
        raise SnapshotError(
            f"RAM blocks claim {prefix.total_ram:,} bytes ({pages:,} pages), more than a file "
            f"of {allocated:,} bytes on disk can hold the bitmaps of")


__all__ = ["BlockInfo", "Snapshot", "VerifyResult", "open_snapshot", "PAGE_SIZE"]
