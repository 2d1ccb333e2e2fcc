"""A restore's QEMU, started before the rest of vmsnap loads.

vmsnap's start-up (numpy, QEMU's QMP library, the file reader) and QEMU's own (until its QMP
socket answers) overlap when QEMU starts first, for every restore that launches QEMU, eager
or lazy. What its command line needs is known early: a command line given after `--` for
an eager restore or the postcopy engine needs nothing from the file; the stored command
line, the engine `auto` picks and the page area the mmap engine maps need the trailer's
metadata (commit record and JSON: a few KiB whatever the RAM size; its signature checks
without the checksum tables, see fileformat.trailer). This module reads those with the
standard library (trailer.py, hostkey.py, relaunch.py and mapped.py load no numpy) and
starts QEMU.

Nothing decided here goes unchecked: once the restore has opened the file (what is
checked is what is loaded), `EarlyQemu.matches` compares it with what the launch was
decided from (the same inode, commit record and metadata, and the mapped page area); if
anything differs the early QEMU is ended and the restore launches as if there had been
none. The stored command line runs only once its signature verified (relaunch.approve,
as always). A file this cannot read is left to the restore, which refuses it, in one
line, before any QEMU starts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..fileformat.errors import SnapshotError
from ..fileformat.trailer import Trailer, TrailerMetadata, read_body, read_commit
from ..hostkey import trust_of
from .mapped import MAPPED_BLOCK, mapped_argv, pick_engine
from .relaunch import RelaunchLock, Started, approve, start_qemu

if TYPE_CHECKING:
    from ..fileformat.reader import Snapshot


@dataclass(frozen=True)
class _Area:
    pages_offset: int
    used_length: int


@dataclass
class _Head:
    """A snapshot as its trailer tells before the file is opened (mapped.Mappable)."""

    path: str
    trailer: Trailer

    @property
    def metadata(self) -> TrailerMetadata:
        return self.trailer.metadata

    def block(self, name: str) -> _Area:
        return _Area(*self.trailer.page_areas()[name])


@dataclass
class EarlyQemu:
    """A QEMU started before the file was opened, and what its launch was decided from:
    the file's (st_dev, st_ino) and trailer (None: nothing, a given command line) and the
    page area it maps."""

    started: Started
    file: tuple[int, int] | None = None
    trailer: Trailer | None = None
    mapped: _Area | None = None
    #: the file's (st_dev, st_ino) and a trailer of it whose checksum tables load from
    #: QEMU's spawn on, for the open to take over (fileformat.reader.open_snapshot)
    loading: tuple[tuple[int, int], Trailer] | None = None

    def matches(self, snap: Snapshot) -> bool:
        """Whether the opened `snap` is what this QEMU was launched for."""
        if self.file is None or self.trailer is None:
            return True
        if not (snap.is_file(self.file) and snap.trailer is not None
                and snap.trailer.commit == self.trailer.commit
                and snap.metadata == self.trailer.metadata):
            return False
        if self.mapped is None:
            return True
        try:
            block = snap.block(MAPPED_BLOCK)
        except KeyError:
            return False
        return _Area(block.pages_offset, block.used_length) == self.mapped

    def discard(self) -> None:
        """End the QEMU (and release the relaunch lock): the restore will not use it."""
        self.started.discard()


def start_early(path: str, command: Sequence[str] | None, engine: str | None,
                trust_command_line: bool) -> EarlyQemu | None:
    """Start the QEMU of a restore of the snapshot at `path` that vmsnap launches
    (`command`, or the stored command line), if its command line is known before the file
    is opened; None if it is not (a remote or unreadable file, no trailer, a libvirt
    domain's file). `engine`: the lazy restore's, None for an eager one (which maps
    nothing). Raises the refusals the restore would make (engine, trust, a running
    original, the relaunch lock). Then has the kernel read what the open will read
    (_read_ahead)."""
    launched = None
    if command and engine in (None, "postcopy"):  # needs nothing from the file
        launched = EarlyQemu(start_qemu(list(command), path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return launched
    try:
        st = os.fstat(fd)
        trailer = _trailer(fd, st.st_size) if stat.S_ISREG(st.st_mode) else None
        if trailer is not None and launched is None:
            launched = _launch(path, fd, st, trailer, command, engine, trust_command_line)
        if trailer is not None and launched is not None:
            whole = trailer.chunks is None  # else each chunk loads where used (see trailer)
            early = whole and trailer.commit.body_length >= EARLY_TABLES_MIN
            _read_ahead(fd, trailer, body=whole and not early)
            loading = _load_tables(fd, trailer) if early else None
            if loading is not None:
                launched.loading = ((st.st_dev, st.st_ino), loading)
        return launched
    except BaseException:
        if launched is not None:
            launched.discard()
        raise
    finally:
        os.close(fd)  # QEMU holds its own


def _launch(path: str, fd: int, st: os.stat_result, trailer: Trailer,
            command: Sequence[str] | None, engine: str | None,
            trust_command_line: bool) -> EarlyQemu | None:
    """start_early's QEMU, for the file `fd` (at `path`, `st`) whose trailer reads."""
    if not trailer.page_areas() or (not command and trailer.metadata.domain_xml is not None):
        return None
    argv = list(command) if command else trailer.metadata.command_line
    if not argv:
        return None
    head = _Head(path, trailer)
    mmap = engine is not None and pick_engine(engine, head, argv, None) == "mmap"
    program = None if command else approve(argv, trust_of(trailer, tables=False),
                                            trust_command_line, path)
    lock = None if command else RelaunchLock(path)
    try:
        started = start_qemu(argv, path, program,
                             launch_argv=mapped_argv(argv, head, fd) if mmap else None,
                             pass_fds=(fd,) if mmap else ())
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    started.lock = lock
    return EarlyQemu(started, (st.st_dev, st.st_ino), trailer,
                     head.block(MAPPED_BLOCK) if mmap else None)


#: _read_ahead asks for this much at a time (the kernel reads at most the larger of its
#: read-ahead window and the device's largest request of one: 128 KiB on some hosts), and
#: for this much in all (a lying trailer costs no more)
READ_AHEAD_CHUNK = 128 << 10
READ_AHEAD_MAX = 256 << 20


def _read_ahead(fd: int, trailer: Trailer, body: bool) -> None:
    """Have the kernel read into the page cache, in the background, what opening the file
    `fd` reads (the stream's non-page ranges, which its trailer lists: header, block
    records and bitmaps, device state; and with `body` the trailer's body with the
    checksum tables) while the rest of vmsnap loads: some twenty reads spread over the
    file, and the tables (2 MiB per GiB of RAM), no longer one after the other on the
    open's way. Tables that load from the spawn on (_load_tables) are read by their own
    thread at once: asking for them here too cost this thread one call per
    READ_AHEAD_CHUNK (3 ms at 8 GiB, quiet; 6-7 ms at load 2-3); tables in chunks are not
    read by the open at all. A range that lies only costs a read: the open checks what it
    reads."""
    wanted = [(r.start, r.length) for r in trailer.ranges]
    if body:
        wanted.append((trailer.commit.body_offset, trailer.commit.body_length))
    budget = READ_AHEAD_MAX
    for start, length in wanted:
        end = start + min(length, budget)
        for at in range(start, end, READ_AHEAD_CHUNK):
            os.posix_fadvise(fd, at, min(READ_AHEAD_CHUNK, end - at), os.POSIX_FADV_WILLNEED)
        budget -= end - start


#: checksum tables (8 bytes a page) at least this large load from QEMU's spawn on; smaller
#: ones load at the open, in the thread the QMP round trips leave room for (1-2 GiB, load 3:
#: ready 9-18 ms after the open, well before a stream needs them), not in the imports'
#: time, when both CPUs are busy (QEMU's start-up and vmsnap's): there they cost more
EARLY_TABLES_MIN = 8 << 20


def _load_tables(fd: int, trailer: Trailer) -> Trailer | None:
    """The trailer of the file `fd` again (its body head is in the page cache by now), its
    checksum tables loading in a thread from now on, on a descriptor of their own: the
    open takes them over (fileformat.trailer.read_body) instead of starting to read and
    check them only once numpy and the reader have loaded (2 MiB per GiB of RAM: ~30 ms of
    CPU for 8 GiB, where a mapped restore's stream waits for them after a few round trips;
    a file saved by QEMU or unsealed has none). None if it no longer reads the same."""
    tfd = os.dup(fd)
    try:
        again = read_body(_pread(tfd), trailer.commit, tables="thread",
                          ended=lambda: os.close(tfd))
    except (SnapshotError, OSError):
        os.close(tfd)
        return None
    return again if again.head == trailer.head else None


def _pread(fd: int) -> Callable[[int, int], bytes]:
    """A pread of the file `fd` that reads all it is asked for (os.pread: no zeroed buffer
    first, the interpreter let go of while the kernel copies)."""
    def pread(offset: int, length: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise SnapshotError("file truncated")
        return data

    return pread


def _trailer(fd: int, size: int) -> Trailer | None:
    """The trailer of the file `fd`, its checksum tables read only if asked for (the
    signature of a file signed before their digest); None if it has none that reads."""
    pread = _pread(fd)
    try:
        return read_body(pread, read_commit(pread, size), tables="asked")
    except (SnapshotError, OSError):
        return None
