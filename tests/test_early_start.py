"""orchestration.early: a restore's QEMU starts before the file is opened only from a
trailer that reads, deciding it loads no numpy, and the refusals come first; once it is
started, what the open reads is read ahead. On real QEMU: an eager restore that launches
QEMU starts it first too, and one that fails after that leaves no QEMU, lock or directory
behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from test_lazy_restore import _kill, launches, probed, saved
from test_save_restore import qemu_pids_using

import vmsnap
from testbed.cli import events, ok
from testbed.craft import flip_page_bit, reseal, unchunk
from testbed.guests import BootGuest
from testbed.pagecache import cached, evict
from testbed.qemu import Vm
from vmsnap.errors import VmsnapError
from vmsnap.fileformat.trailer import (
    BlockChecksums,
    RangeChecksum,
    TrailerMetadata,
    encode_trailer,
)
from vmsnap.io.aligned import AlignedBuffer
from vmsnap.orchestration.early import start_early

STREAM_END = 3 << 20


def snapshot(path, version="10.0.0", command=("qemu-system-x86_64", "-m", "1"), extra=None,
             entries=4, chunked=True):
    """A file with a trailer (the stream is not one: nothing here reads it) whose pc.ram
    pages are at 1 MiB, 1 MiB long, as its ranges tell; its checksum table has `entries`
    (not `chunked`: as older vmsnaps wrote it, checked whole)."""
    md = TrailerMetadata(qemu_version=version, machine_type="pc-i440fx-7.2",
                         command_line=list(command) if command else None, extra=extra or {})
    blocks = [BlockChecksums("pc.ram", np.arange(entries, dtype=np.uint64))]
    ranges = [RangeChecksum(0, 100, 1), RangeChecksum(2 << 20, 4096, 1)]
    off, tr = encode_trailer(STREAM_END, md, blocks, ranges)
    path.write_bytes(bytes(off) + tr)
    if not chunked:
        unchunk(path)
    return str(path)


def test_deciding_loads_no_numpy():
    """What runs before a restore's QEMU starts: deciding its command line, and the
    check that the kernel can populate (--populate)."""
    code = ("import sys, vmsnap.orchestration.early, vmsnap.orchestration.populate\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('numpy', 'qemu')"
            " or m == 'vmsnap.fileformat.reader'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_early_start_without_a_trailer_or_a_command_line(tmp_path):
    """Left to the restore (which refuses in one line, or restores through libvirt): no
    file, no trailer, no stored command line, a libvirt domain's file."""
    assert start_early(str(tmp_path / "none"), None, "auto", False) is None
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(1 << 16))
    assert start_early(str(junk), ["qemu-system-x86_64"], "auto", False) is None
    assert start_early(snapshot(tmp_path / "a", command=None), None, "auto", False) is None
    domain = snapshot(tmp_path / "b", extra={"libvirt": {"xml": "<domain/>"}})
    assert start_early(domain, None, "auto", False) is None


def test_refusals_come_before_any_qemu(tmp_path):
    """The engine's and the stored command line's refusals, as the restore words them."""
    old = snapshot(tmp_path / "a", version="7.2.0")
    with pytest.raises(VmsnapError, match="needs QEMU >= 8.2"):
        start_early(old, ["qemu-system-x86_64", "-m", "1"], "mmap", False)
    with pytest.raises(VmsnapError, match="will not run the command line stored"):
        start_early(snapshot(tmp_path / "b"), None, "auto", False)


def test_what_the_open_reads_is_read_ahead(tmp_path):
    """Once QEMU is started (here a stand-in that exits at once), the kernel reads what the
    open will (the trailer's ranges and body: here 16 MiB of checksum tables, more than the
    kernel reads ahead of one request) into the page cache while vmsnap loads; not the
    pages."""
    path = snapshot(tmp_path / "a", entries=2 << 20, chunked=False)
    evict(path)
    launched = start_early(path, ["true"], "postcopy", False)
    assert launched is not None
    try:
        body = STREAM_END >> 12, (os.path.getsize(path) >> 12) - (STREAM_END >> 12)
        deadline = time.monotonic() + 10
        while not (cached(path, 0, 1).all() and cached(path, 2 << 20, 1).all()
                   and cached(path, body[0] << 12, body[1]).all()):
            assert time.monotonic() < deadline, "not read ahead"
            time.sleep(0.01)
        assert not cached(path, 1 << 20, 256).any()  # pc.ram's pages
    finally:
        launched.discard()


def test_tables_loading_from_the_spawn_are_not_also_read_ahead(tmp_path, monkeypatch):
    """Tables of EARLY_TABLES_MIN or more are read at once by their own thread: the thread
    that starts QEMU asks the kernel for the other ranges only (one call per
    READ_AHEAD_CHUNK of tables cost it 3 ms at 8 GiB); smaller ones are still read ahead."""
    from vmsnap.orchestration import early

    asked = []
    real = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        asked.append(offset)
        real(fd, offset, length, advice)

    monkeypatch.setattr(early.os, "posix_fadvise", fadvise)
    for entries, body_asked in ((2 << 20, False), (4, True)):
        asked.clear()
        path = snapshot(tmp_path / f"t{entries}", entries=entries, chunked=False)
        launched = start_early(path, ["true"], "postcopy", False)
        assert launched is not None
        try:
            assert (launched.loading is None) == body_asked
            assert any(at >= STREAM_END for at in asked) == body_asked
            assert 0 in asked and 2 << 20 in asked  # the ranges, either way
        finally:
            launched.discard()


RAM = 8 << 20


def written(path, chunked=False):
    """A real snapshot (stream, pages, trailer with a checksum table of 2048 entries; not
    `chunked`: checked whole, as older vmsnaps wrote it)."""
    from fileformat.streambytes import prefix, tail

    from vmsnap.fileformat import SnapshotWriter

    w = SnapshotWriter(str(path), TrailerMetadata(
        qemu_version="10.0.0", machine_type="pc-q35-10.0",
        command_line=["qemu-system-x86_64", "-m", "8M"]))
    w.begin(prefix("pc-q35-10.0", [("pc.ram", RAM)]), [("pc.ram", RAM)])
    pages = RAM // 4096
    w.write_pages("pc.ram", np.arange(pages, dtype=np.uint64) * 4096,
                  np.random.default_rng(1).integers(0, 256, RAM, dtype=np.uint8).data)
    w.finish(tail())
    if not chunked:
        unchunk(path)
    return str(path)


def test_the_checksum_tables_load_from_the_spawn_and_the_open_takes_them_over(tmp_path,
                                                                            monkeypatch):
    """Once QEMU is started, the checksum tables (2 MiB per GiB of RAM) are read and checked
    in the background while vmsnap loads, and the open uses them instead of reading them
    again (which began only once numpy and the reader had loaded, on a mapped restore's way
    to the guest running): the same check, of the same bytes of the same file."""
    from vmsnap.fileformat import open_snapshot
    from vmsnap.orchestration import early

    path = written(tmp_path / "a")
    small = start_early(path, ["true"], "postcopy", False)
    assert small is not None and small.loading is None  # 16 KiB: loaded at the open
    small.discard()
    monkeypatch.setattr(early, "EARLY_TABLES_MIN", 0)  # as if it were 8 MiB (4 GiB of RAM)
    launched = start_early(path, ["true"], "postcopy", False)
    assert launched is not None
    try:
        assert launched.loading is not None
        tables = launched.loading[1].tables
        tables.wait()  # loaded in a thread of its own, before the open
        with open_snapshot(path, loading=launched.loading) as snap:
            assert snap.trailer is not None and snap.trailer.tables is tables
            assert snap.verify().pages == RAM // 4096
        other = written(tmp_path / "b")  # the same bytes, another file
        with open_snapshot(other, loading=launched.loading) as snap:
            assert snap.trailer is not None and snap.trailer.tables is not tables
    finally:
        launched.discard()


def test_a_damaged_table_loaded_from_the_spawn_is_still_refused(tmp_path, monkeypatch):
    """A table read before the open is checked as the open's own would be: a flipped bit
    is refused where the tables are first used (before a restore sends a byte)."""
    from vmsnap.fileformat import open_snapshot
    from vmsnap.fileformat.errors import CorruptTrailer

    path = written(tmp_path / "a")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # a table entry: 8 bytes per page, before the commit record
        f.seek(size - 64 - 8 * 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    from vmsnap.orchestration import early

    monkeypatch.setattr(early, "EARLY_TABLES_MIN", 0)
    launched = start_early(path, ["true"], "postcopy", False)
    assert launched is not None and launched.loading is not None
    try:
        with open_snapshot(path, loading=launched.loading) as snap:
            assert snap.trailer is not None and snap.trailer.tables is launched.loading[1].tables
            with pytest.raises(CorruptTrailer, match="body checksum mismatch"):
                snap.check_stream_ranges()
    finally:
        launched.discard()


def test_tables_in_chunks_are_not_read_before_the_guest_runs(tmp_path, monkeypatch):
    """A file whose tables are in chunks: nothing before a postcopy restore's first byte
    reads them, nor asks the kernel for them (start_early, the open, the stream ranges'
    check, the postcopy source's making); its pusher reads the chunk of each page it checks,
    when it checks it."""
    from vmsnap.fileformat import open_snapshot
    from vmsnap.fileformat import trailer as trailer_mod
    from vmsnap.io.direct import DirectFile
    from vmsnap.ops.postcopy_send import PostcopySource
    from vmsnap.orchestration import early

    monkeypatch.setattr(trailer_mod, "CHUNK_ENTRIES", 256)  # pc.ram's 2048 in 8 chunks
    path = written(tmp_path / "a", chunked=True)
    with open_snapshot(path) as snap:
        commit, head = snap.trailer.commit, snap.trailer.head
    tables = commit.body_offset + len(head), commit.body_offset + commit.body_length
    reads = []
    real_pread, real_fadvise = DirectFile.pread_meta, os.posix_fadvise

    def pread_meta(self, offset, length):
        reads.append((offset, length))
        return real_pread(self, offset, length)

    def fadvise(fd, offset, length, advice):
        reads.append((offset, length))
        real_fadvise(fd, offset, length, advice)

    def in_tables():
        return [(o, n) for o, n in reads if o < tables[1] and o + n > tables[0]]

    monkeypatch.setattr(DirectFile, "pread_meta", pread_meta)
    monkeypatch.setattr(early.os, "posix_fadvise", fadvise)
    launched = start_early(path, ["true"], "postcopy", False)
    assert launched is not None and launched.loading is None
    try:
        with open_snapshot(path, loading=launched.loading) as snap:
            source = PostcopySource(snap)
            assert source.prologue and in_tables() == []
            b = snap.block("pc.ram")
            source._read_checked(b, np.arange(600, 700), AlignedBuffer(100 * 4096))
            assert in_tables() == [(tables[0] + 2 * 256 * 8, 256 * 8)]  # chunk 2
    finally:
        launched.discard()


@pytest.mark.qemu
def test_eager_restore_starts_qemu_before_loading_the_rest(workdir, request):
    """An eager restore that launches QEMU starts it before numpy, QEMU's QMP library or the
    file reader load, so QEMU's start-up overlaps vmsnap's, as a lazy one does: the stored
    command line (QEMU 7.2, its signature checked from the metadata alone; stream path) and
    `-- QEMU_COMMAND` (QEMU 10, on the stream path and with --no-verify, where QEMU reads
    the file itself). The guest's RAM then checks."""
    guest = BootGuest(memory_mb=256)
    for qemu, ram_paths in (("7.2", {"stream": []}),
                            ("10", {"stream": [], "qemu": ["--no-verify"]})):
        snap, argv, held = saved(guest, qemu, workdir, workdir / f"vm{qemu}.snap")
        for ram_path, flags in ram_paths.items():
            how = [snap] if qemu == "7.2" else [snap, "--", *argv]
            result = ok(probed(workdir, "restore", "--json", "--paused", *flags, *how))
            done = events(result)[-1]
            request.addfinalizer(lambda pid=done["pid"]: _kill(pid))
            assert done["event"] == "done" and done["ram_path"] == ram_path
            [loaded] = launches(result)
            assert "vmsnap.orchestration.relaunch" in loaded  # the probe works
            early = [m for m in loaded if m.split(".")[0] in ("numpy", "qemu")
                     or m == "vmsnap.fileformat.reader"]
            assert early == [], early
            with Vm(guest.config(qemu, workdir), workdir, "src").adopt(done["pid"]) as vm:
                guest.check_restored(vm, held)
                vm.cmd("quit")
    assert [d for d in os.listdir(workdir) if d.startswith("vmsnap-")] == []


@pytest.mark.qemu
def test_eager_restore_failing_after_the_early_start_leaves_nothing(workdir, monkeypatch):
    """An eager relaunch of the stored command line whose QEMU started before the file was
    opened, then failed: the path named another file by the open, whose command line is
    refused (its metadata altered; the early QEMU is discarded first), or the file's page
    is corrupt (found while streaming into that QEMU). Either way one error, the early QEMU
    ended, its relaunch lock released (a flock on the file it was taken on succeeds) and
    its directory removed."""
    from vmsnap.orchestration import early

    guest = BootGuest(memory_mb=256)
    snap, _, _ = saved(guest, "7.2", workdir)
    altered = workdir / "altered.snap"
    shutil.copyfile(snap, altered)
    reseal(altered, lambda md: md.update(created="2000-01-01T00:00:00Z"))
    started = []

    def start_then(swap):
        def start(*args, **kwargs):
            started.append(real(*args, **kwargs))
            swap()
            return started[-1]
        return start

    real = early.start_early
    monkeypatch.setattr(tempfile, "tempdir", str(workdir))
    for swap, error in ((lambda: os.replace(altered, snap), "altered"),
                        (lambda: flip_page_bit(snap), "pc.ram")):
        locked = workdir / "locked.snap"  # the inode the early start reads and locks
        os.link(snap, locked)
        started.clear()
        monkeypatch.setattr(early, "start_early", start_then(swap))
        with pytest.raises(VmsnapError, match=error):
            vmsnap.restore(snap, paused=True)
        [launched] = started
        assert launched is not None and launched.started.proc.poll() is not None
        assert not os.path.exists(launched.started.workdir)
        assert qemu_pids_using(workdir) == []
        assert [d for d in os.listdir(workdir) if d.startswith("vmsnap-")] == []
        with open(locked) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(locked, snap)  # the file saved, for the next round
