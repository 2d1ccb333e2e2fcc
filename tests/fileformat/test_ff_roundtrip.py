import errno
import os
import stat

import numpy as np
import pytest
import streambytes

from testbed.pagecache import cached, evict
from vmsnap.fileformat import (
    ChecksumMismatch,
    CorruptTrailer,
    IncompleteSnapshot,
    SnapshotError,
    SnapshotWriter,
    TrailerMetadata,
    UnsupportedVersion,
    compute_layout,
    open_snapshot,
)
from vmsnap.fileformat.trailer import CommitRecord
from vmsnap.io import AlignedBuffer
from vmsnap.io.direct import DirectFile

PS = 4096
BLOCKS = [("pc.ram", 16 << 20), ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000)]


@pytest.fixture(params=["disk", "shm"])
def snapdir(request, tmp_path):
    if request.param == "disk":
        yield tmp_path  # /tmp on this host is ext4 (same fs as /var/tmp)
        return
    d = f"/dev/shm/vmsnap-test-{os.getpid()}-{tmp_path.name}"
    os.makedirs(d)
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def meta():
    return TrailerMetadata(qemu_version="10.0.0", machine_type="pc-q35-10.0",
                           command_line=["qemu-system-x86_64", "-m", "16"])


def write_random(path, rng, direct=True):
    """Write a file with random pages, rewrites and zeroing; return the expected RAM."""
    prefix = streambytes.prefix("pc-q35-10.0", BLOCKS)
    ram = {n: np.zeros(ln, np.uint8) for n, ln in BLOCKS}
    w = SnapshotWriter(path, meta(), direct=direct, buffer_size=1 << 20)
    lay = w.begin(prefix, BLOCKS)
    assert lay == compute_layout(BLOCKS, len(prefix))
    size_after_begin = os.path.getsize(str(path) + ".partial")
    for _ in range(30):
        name, ln = BLOCKS[rng.integers(len(BLOCKS))]
        npg = ln // PS
        if rng.random() < 0.5:  # contiguous run
            a = int(rng.integers(npg))
            pages = np.arange(a, min(npg, a + int(rng.integers(1, 600))))
        else:
            pages = rng.choice(npg, size=min(npg, int(rng.integers(1, 300))), replace=False)
        data = rng.integers(0, 256, len(pages) * PS, dtype=np.uint8)
        if rng.random() < 0.5:
            data = memoryview(data.tobytes())[0:]  # unaligned-ish bytes source
        else:
            buf = AlignedBuffer(len(pages) * PS)
            buf.array[:] = np.frombuffer(data, np.uint8)
            data = buf.view
        w.write_pages(name, pages.astype(np.uint64) * PS, data)
        arr = np.frombuffer(data, np.uint8).reshape(-1, PS)
        ram[name].reshape(-1, PS)[pages] = arr
        if rng.random() < 0.3:
            z = rng.choice(npg, size=min(npg, 50), replace=False)
            w.zero_pages(name, z.astype(np.uint64) * PS)
            ram[name].reshape(-1, PS)[z] = 0
        assert os.path.getsize(str(path) + ".partial") == size_after_begin  # never grows
    tail = streambytes.tail()
    assert w.finish(tail) == str(path)
    return ram, tail, w


@pytest.mark.parametrize("direct", [True, False])
def test_write_read_roundtrip(snapdir, direct):
    rng = np.random.default_rng(42)
    path = os.path.join(snapdir, "snap.vms")
    ram, tail, w = write_random(path, rng, direct)
    assert w.direct == direct
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path + ".partial")
    with open_snapshot(path) as s:
        assert not s.native and s.metadata.machine_type == "pc-q35-10.0"
        assert s.metadata.command_line == ["qemu-system-x86_64", "-m", "16"]
        assert s.tail == tail
        assert s.stream.capabilities == ("mapped-ram",)
        assert [(b.name, b.used_length) for b in s.blocks] == BLOCKS
        buf = AlignedBuffer(16 << 20)
        for b in s.blocks:
            got = np.zeros(b.used_length, np.uint8)
            for first, count in s.present_runs(b):
                mv = s.read_pages(b, int(first), int(count), into=buf)
                got[first * PS:(first + count) * PS] = np.frombuffer(mv, np.uint8)
            assert (got == ram[b.name]).all(), b.name
            # present bit <=> page written and not zeroed afterwards (random data ≠ 0)
            nz = ram[b.name].reshape(-1, PS).any(axis=1)
            assert (b.present == nz).all()
        seen = []
        res = s.verify(progress=lambda d, t: seen.append((d, t)))
        assert res.pages == sum(b.present_count for b in s.blocks)
        assert seen[-1][0] == seen[-1][1] == res.bytes


def test_sparse_allocation(tmp_path):
    path = tmp_path / "sparse.vms"
    blocks = [("pc.ram", 256 << 20)]
    w = SnapshotWriter(path, meta())
    w.begin(streambytes.prefix("pc-q35-10.0", blocks), blocks)
    pages = np.arange(1000, 1256, dtype=np.uint64)  # 1 MiB present
    w.write_pages("pc.ram", pages * PS, os.urandom(256 * PS))
    w.write_pages("pc.ram", pages[:10] * PS, os.urandom(10 * PS))  # rewrite in place
    w.finish(streambytes.tail())
    st = os.stat(path)
    assert st.st_size > 256 << 20
    alloc = st.st_blocks * 512
    assert 1 << 20 <= alloc <= (1 << 20) + (256 << 10), alloc
    with open_snapshot(path) as s:
        assert s.blocks[0].present_count == 256
        s.verify()


def test_atomic_abort_keeps_previous(tmp_path):
    path = tmp_path / "snap.vms"
    path.write_bytes(b"previous")
    os.chmod(path, 0o644)
    with SnapshotWriter(path, meta()) as w:
        w.begin(streambytes.prefix("m", BLOCKS), BLOCKS)
        w.write_pages("pc.ram", np.array([0], np.uint64), os.urandom(PS))
        assert os.path.exists(str(path) + ".partial")
        assert stat.S_IMODE(os.stat(str(path) + ".partial").st_mode) == 0o600
    assert path.read_bytes() == b"previous"
    assert not os.path.exists(str(path) + ".partial")
    w2 = SnapshotWriter(path, meta())
    w2.begin(streambytes.prefix("m", BLOCKS), BLOCKS)
    w2.abort()
    assert path.read_bytes() == b"previous" and not os.path.exists(str(path) + ".partial")


def test_writer_rejects_bad_input(tmp_path):
    w = SnapshotWriter(tmp_path / "x", meta())
    w.begin(streambytes.prefix("m", BLOCKS), BLOCKS)
    with pytest.raises(SnapshotError):
        w.write_pages("nope", np.array([0], np.uint64), bytes(PS))
    with pytest.raises(SnapshotError):
        w.write_pages("pc.ram", np.array([100], np.uint64), bytes(PS))
    with pytest.raises(SnapshotError):
        w.write_pages("pc.bios", np.array([0x40000], np.uint64), bytes(PS))
    with pytest.raises(ValueError):
        w.write_pages("pc.ram", np.array([0], np.uint64), bytes(PS - 1))
    w.abort()


@pytest.fixture
def small_snapshot(tmp_path):
    rng = np.random.default_rng(7)
    path = str(tmp_path / "c.vms")
    write_random(path, rng)
    return path


def test_page_areas_from_the_metadata_alone(small_snapshot):
    """Where each block's pages are, told by the trailer's ranges before the stream is read
    (a mapped restore's QEMU starts from it), is where the stream puts them."""
    with open_snapshot(small_snapshot) as s:
        assert s.trailer.page_areas() == {b.name: (b.pages_offset, b.used_length)
                                          for b in s.blocks}
        s.trailer.ranges.pop(1)
        assert s.trailer.page_areas() == {}


def flip(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


@pytest.mark.parametrize("warm", [False, True], ids=["direct", "warm"])
def test_bitflip_in_page_named(small_snapshot, warm):
    with open_snapshot(small_snapshot) as s:
        b = s.block("pc.ram")
        first, count = s.present_runs(b)[3]
        page = int(first) + int(count) - 1
        target = b.pages_offset + page * PS + 1234
    flip(small_snapshot, target, 5)
    with open_snapshot(small_snapshot) as s, pytest.raises(ChecksumMismatch) as ei:
        s.verify(warm=warm)
    assert ei.value.block == "pc.ram" and ei.value.offset == page * PS
    assert f"offset {page * PS:#x}" in str(ei.value)


def test_warm_verify_leaves_the_pages_cached(small_snapshot):
    """verify(warm=True) (the mmap engine's background check) reads the pages through the
    page cache and leaves them there, so a guest mapping the file finds them in memory and
    the disk is read once; the default check reads with O_DIRECT and leaves them out."""
    for warm in (False, True):
        evict(small_snapshot)
        with open_snapshot(small_snapshot) as s:
            assert s.direct
            ram = s.block("pc.ram")
            assert not cached(small_snapshot, ram.pages_offset, ram.npages).any()
            s.verify(warm=warm)
            for b in s.blocks:
                resident = cached(small_snapshot, b.pages_offset, b.npages)[b.present]
                assert resident.all() == warm, (b.name, warm, resident.mean())


@pytest.mark.parametrize("warm", [False, True], ids=["direct", "warm"])
def test_unreadable_page_named(small_snapshot, warm):
    """A read of many pages that fails (here: the file cut short in their middle once open)
    names the first page that cannot be read: its block, its offset in it, its file offset."""
    with open_snapshot(small_snapshot) as s:
        b = s.block("pc.ram")
        runs = s.present_runs(b)
        first, count = (int(x) for x in runs[np.argmax(runs[:, 1])])
        assert count > 2
        page = first + count // 2
        os.truncate(small_snapshot, b.pages_offset + page * PS + 100)
        with pytest.raises(SnapshotError) as ei:
            s.read_pages(b, first, count, AlignedBuffer(count * PS), cached=warm)
    assert (f"cannot read block 'pc.ram' page at offset {page * PS:#x} "
            f"(file offset {b.pages_offset + page * PS:#x}): unexpected end of file"
            in str(ei.value)), ei.value


def test_a_read_that_fails_once_is_read_again(small_snapshot, monkeypatch):
    """A read of many pages that fails once (a transient I/O error) is read again page by
    page: the pages come, checked."""
    failed = []
    real = DirectFile.read_into

    def once(self, offset, bufs, **kw):
        if not failed and sum(memoryview(b).nbytes for b in bufs) > PS:
            failed.append(offset)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, offset, bufs, **kw)

    monkeypatch.setattr(DirectFile, "read_into", once)
    with open_snapshot(small_snapshot) as s:
        s.verify()
    assert failed


def test_bitflip_in_device_state_and_header(small_snapshot):
    with open_snapshot(small_snapshot) as s:
        tail_off = s.tail_offset
    flip(small_snapshot, tail_off + 30)
    with open_snapshot(small_snapshot) as s, pytest.raises(ChecksumMismatch, match="stream"):
        s.verify()
    flip(small_snapshot, tail_off + 30)
    flip(small_snapshot, 20)  # machine type byte
    with open_snapshot(small_snapshot) as s, pytest.raises(ChecksumMismatch, match="stream"):
        s.verify()


def test_truncated(small_snapshot):
    size = os.path.getsize(small_snapshot)
    for cut in (size - 1, size - 100, size // 2, 5000, 10):
        os.truncate(small_snapshot, cut)
        with pytest.raises(SnapshotError) as ei:
            open_snapshot(small_snapshot)
        assert "\n" not in str(ei.value)
    with pytest.raises(SnapshotError):
        os.truncate(small_snapshot, 0)
        open_snapshot(small_snapshot)


def test_truncated_at_tail_is_incomplete(small_snapshot):
    with open_snapshot(small_snapshot) as s:
        end = s.stream_end
    os.truncate(small_snapshot, end - 10)
    with pytest.raises(IncompleteSnapshot):
        open_snapshot(small_snapshot)


def test_wrong_magic_and_version(small_snapshot):
    data = open(small_snapshot, "rb").read()
    rec = CommitRecord.parse(data[-64:], len(data))
    with open(small_snapshot, "r+b") as f:
        f.seek(len(data) - 64)
        f.write(CommitRecord(9, rec.body_offset, rec.body_length, rec.body_xxh3,
                             rec.stream_end).pack())
    with pytest.raises(UnsupportedVersion, match="version 9"):
        open_snapshot(small_snapshot)
    with open(small_snapshot, "r+b") as f:
        f.seek(len(data) - 64)
        f.write(b"VMSNAPC1"[:7] + b"X")
    # no commit record and garbage after the QEMU stream → incomplete
    with pytest.raises(IncompleteSnapshot):
        open_snapshot(small_snapshot)
    flip(small_snapshot, rec.body_offset + 3)
    with open(small_snapshot, "r+b") as f:
        f.seek(len(data) - 64)
        f.write(rec.pack())
    with pytest.raises(CorruptTrailer):
        open_snapshot(small_snapshot)
    flip(small_snapshot, 0)  # QEVM magic
    with pytest.raises(SnapshotError):
        open_snapshot(small_snapshot)


def test_io_error_in_writer_thread_propagates(tmp_path, monkeypatch):
    from vmsnap.io import direct as direct_mod
    path = tmp_path / "e.vms"
    path.write_bytes(b"old")
    w = SnapshotWriter(path, meta(), buffer_size=1 << 20)
    w.begin(streambytes.prefix("m", BLOCKS), BLOCKS)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(direct_mod, "pwritev_all", boom)
    with pytest.raises(OSError, match="No space"):
        for _ in range(4):
            w.write_pages("pc.ram", np.arange(512, dtype=np.uint64) * PS,
                          bytes(512 * PS))  # bytes → copied → I/O thread
        w.finish(b"")
    w.abort()
    assert path.read_bytes() == b"old" and not os.path.exists(str(path) + ".partial")


def test_duplicate_pages_last_wins(tmp_path):
    path = tmp_path / "d.vms"
    w = SnapshotWriter(path, meta())
    w.begin(streambytes.prefix("m", BLOCKS), BLOCKS)
    a, b = os.urandom(PS), os.urandom(PS)
    w.write_pages("pc.bios", np.array([0, PS, 0], np.uint64), a + b + b)
    buf = AlignedBuffer(PS)
    buf.array[:] = 9
    w.write_pages("pc.bios", np.array([PS], np.uint64), buf.view)  # aligned, direct path
    w.finish(streambytes.tail())
    with open_snapshot(path) as s:
        s.verify()
        assert bytes(s.read_pages("pc.bios", 0, 2)) == b + b"\x09" * PS


def test_aligned_set_joins_runs_and_keeps_last_copy(tmp_path, monkeypatch):
    """Two buffers as multifd channels fill them on QEMU 7.2: packets of pages 0-15 and
    15-30 (page 15 twice), then 30-45 in the other buffer (page 30 twice). The last copy of
    a page lands and is checksummed; the pages leave in one pwritev of three pieces."""
    from vmsnap.fileformat.writer import AlignedPages
    from vmsnap.io import direct as direct_mod
    path = tmp_path / "s.vms"
    w = SnapshotWriter(path, meta())
    w.begin(streambytes.prefix("m", BLOCKS), BLOCKS)
    a, b = AlignedBuffer(32 * PS), AlignedBuffer(16 * PS)
    a.array.reshape(-1, PS)[:] = np.arange(32, dtype=np.uint8)[:, None]
    b.array.reshape(-1, PS)[:] = np.arange(100, 116, dtype=np.uint8)[:, None]
    calls = []
    real = direct_mod.pwritev_all
    monkeypatch.setattr(direct_mod, "pwritev_all",
                        lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off))
    w.write_aligned_set([
        AlignedPages("pc.ram", np.r_[0:16, 15:31].astype(np.uint64) * PS, a.view),
        AlignedPages("pc.ram", np.r_[30:46].astype(np.uint64) * PS, b.view)])
    assert calls == [3]  # pages 0-14 | 15-29 | 30-45 from two buffers, one call
    w.finish(streambytes.tail())
    with open_snapshot(path) as s:
        s.verify()
        got = np.frombuffer(s.read_pages("pc.ram", 0, 47), np.uint8)[::PS]
        assert got.tolist() == [*range(15), *range(16, 31), *range(100, 116), 0]


def test_damaged_checksum_table_refused_where_it_is_needed(tmp_path):
    """The checksum tables (8 bytes a page) load where used, a chunk at a time, so an open
    costs the same whatever the RAM size: a file whose table is damaged still opens, and
    its stream ranges check (the commit record's checksum of the metadata vouches for
    theirs), but every use that needs the damaged chunk refuses it in one line: a page's
    check, verify, the trailer's check. The signature, over the metadata and the tables'
    digest, still verifies: the stored command line is intact."""
    key = os.urandom(32)
    path = str(tmp_path / "t.vms")
    w = SnapshotWriter(path, meta(), signing_key=key)
    w.begin(streambytes.prefix("pc-q35-10.0", BLOCKS), BLOCKS)
    data = np.random.default_rng(3).integers(0, 256, 8 * PS, dtype=np.uint8).tobytes()
    w.write_pages("pc.ram", np.arange(8, dtype=np.uint64) * PS, data)
    w.finish(streambytes.tail())
    with open_snapshot(path) as s:
        assert s.trailer.signature.valid(key)
        commit = s.trailer.commit
    flip(path, commit.body_offset + commit.body_length - 8 * 8)  # pc.ram's first entry
    with open_snapshot(path) as s:
        b = s.block("pc.ram")
        assert s.trailer.signature.valid(key)
        s.check_stream_ranges()
        uses = [s.verify, s.trailer.check, lambda: s.check_pages(b, 0, 8, memoryview(data), 0)]
        for use in uses:
            with pytest.raises(CorruptTrailer, match="body checksum mismatch") as ei:
                use()
            assert "\n" not in str(ei.value)


def test_table_index_counts_present_pages_before(small_snapshot, monkeypatch):
    """BlockInfo.table_index (one count per stride, made on first use, then a count inside
    the stride) is the number of present pages before a page, across stride edges."""
    monkeypatch.setattr("vmsnap.fileformat.reader.INDEX_STRIDE", 64)
    with open_snapshot(small_snapshot) as s:
        for b in s.blocks:
            want = np.cumsum(b.present) - b.present
            assert [b.table_index(p) for p in range(b.npages)] == want.tolist()
