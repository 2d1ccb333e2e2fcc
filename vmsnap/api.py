"""The Python API: blocking wrappers over the asyncio orchestration, plus inspection.

    import vmsnap
    vmsnap.save("/run/vm.qmp", "vm.snap", live=True)
    vmsnap.save("/run/vm.qmp", "vm.snap", background=True)   # point in time, guest runs on
    vmsnap.restore("vm.snap")                  # relaunch from the stored command line
    with vmsnap.open("vm.snap") as snap: ...   # blocks, metadata, verify()
    vmsnap.info("vm.snap"); vmsnap.verify("vm.snap")
    vmsnap.receive(sys.stdin.buffer, "vm.snap"); vmsnap.send("vm.snap", sys.stdout.buffer)

Every `vmsnap` command is a thin layer over these functions. Each one loads the modules it
uses when called: `vmsnap restore` never loads what only a save needs, and the other way round.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import VmsnapError

if TYPE_CHECKING:
    from .fileformat.reader import Snapshot, VerifyResult
    from .libvirt.image import DomainImage
    from .ops.info import SnapshotInfo
    from .ops.receive import Readable, ReceiveStats
    from .ops.send import SendStats, Sink
    from .orchestration.early import EarlyQemu
    from .orchestration.modes import After
    from .orchestration.save import SaveResult
    from .orchestration.target import RestoreResult
    from .progress import Reporter

T = TypeVar("T")
#: whether the `vmsnap` command loads with the cyclic garbage collector off (pause_gc)
_gc_paused = False


def pause_gc() -> None:
    """No cyclic garbage collection while the `vmsnap` command loads (vmsnap.__main__): its
    imports make ~45,000 objects (modules, classes, functions) and next to no garbage, and
    collecting as they come costs ~7 ms of CPU on the way to a lazy restore's guest
    running. It collects again from `resume_gc` on: a verb once it has loaded (_run)."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """Collect as usual again after pause_gc, the objects made so far frozen (never
    scanned again: they live as long as the process)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`. SIGINT and SIGTERM cancel it once, so its cleanup (partial file removed,
    VM resumed) runs to the end: further signals are ignored meanwhile. Then raises
    KeyboardInterrupt, as an interrupted call would."""
    import asyncio  # not before a restore's QEMU starts (see orchestration.early)

    resume_gc()  # what the verb runs has loaded
    signalled = False

    async def main() -> T:
        if threading.current_thread() is threading.main_thread():
            loop, task = asyncio.get_running_loop(), asyncio.current_task()
            assert task is not None  # asyncio.run runs main() as a task

            def interrupt() -> None:
                nonlocal signalled
                if not signalled:
                    signalled = True
                    task.cancel()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, interrupt)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if signalled:
            raise KeyboardInterrupt from None
        raise


def save(qmp_address: str, path: str | os.PathLike[str], *, live: bool = False,
         background: bool = False, after: After | str | None = None, force: bool = False,
         reporter: Reporter | None = None, direct: bool = True, channels: int | None = None,
         downtime_limit_ms: int | None = None, bandwidth_mib_s: int | None = None,
         seal: str = "now") -> SaveResult:
    """Save the VM whose QMP socket is `qmp_address` into the snapshot file `path`.

    Paused by default (the guest is stopped first); `live=True` copies RAM while it runs
    (the file holds RAM at the end); `background=True` keeps it running and saves RAM as it
    was when the save began (QEMU's background-snapshot, one stream).
    `after`: a `vmsnap.After` (or its value): PAUSE (leave it paused), RESUME (a
    checkpoint) or QUIT (end QEMU); default PAUSE, or the VM's own run state for a
    background save.
    `channels`: parallel multifd channels (0: one plain stream; default: from the CPUs, one
    stream from QEMU < 8.1 whose multifd sender busy-waits).
    `downtime_limit_ms`: a live save's longest final stop (default: chosen by vmsnap);
    `bandwidth_mib_s`: a cap on its rounds while the guest runs (default: none).
    `seal`: where QEMU >= 9.1 wrote the pages itself, the file is committed first and its
    page checksums come "now" (before returning), in the "background" (a detached
    `vmsnap seal`) or "later" (run `vmsnap seal`); result.committed_seconds, pages_checked."""
    from .orchestration.converge import LiveLimits
    from .orchestration.save import save as _save

    return _run(_save(qmp_address, path, live=live, background=background, after=after,
                      force=force, reporter=reporter, direct=direct, channels=channels,
                      limits=LiveLimits(downtime_limit_ms, bandwidth_mib_s), seal=seal))


def save_domain(name: str, path: str | os.PathLike[str], *, uri: str | None = None,
                live: bool = False, background: bool = False,
                after: After | str | None = None,
                force: bool = False, reporter: Reporter | None = None,
                direct: bool = True, channels: int | None = 0,
                downtime_limit_ms: int | None = None, bandwidth_mib_s: int | None = None,
                seal: str = "now") -> SaveResult:
    """Save the libvirt domain `name` (connection `uri`, default qemu:///system) into `path`,
    its migratable XML in the file's metadata; pausing, resuming and quitting go through
    libvirt, so its view of the domain stays true. Modes, `after`, `downtime_limit_ms`,
    `bandwidth_mib_s` and `seal` as for `save`; `channels`: default 0, one stream (multifd
    channels need a directory in QEMU's root)."""
    from .libvirt.save import save_domain as _save_domain
    from .orchestration.converge import LiveLimits

    return _run(_save_domain(name, path, uri=uri, live=live, background=background,
                             after=after, force=force, reporter=reporter, direct=direct,
                             channels=channels,
                             limits=LiveLimits(downtime_limit_ms, bandwidth_mib_s),
                             seal=seal))


def restore(path: str | os.PathLike[str], *, qmp_address: str | None = None,
            command: Sequence[str] | None = None, paused: bool = False,
            reporter: Reporter | None = None, direct: bool = True,
            channels: int | None = None, trust_command_line: bool = False,
            lazy: str | None = None, verify: bool | None = None,
            resume: bool = False, populate: bool = False) -> RestoreResult:
    """Restore `path` into the QEMU at `qmp_address` (started with -incoming defer), or into
    one launched from `command`, or from the command line stored in the file: that one runs
    only if this host's key signed the file, or with `trust_command_line` (after reading
    it), and only if it starts a QEMU system emulator.
    `channels`: parallel multifd channels (0: one plain stream; default: from the CPUs).
    `lazy`: "auto", "postcopy" or "mmap": the guest runs at once and its RAM follows
    (a LazyRestoreResult, with the time to running and page-request latencies);
    `verify`: None (default) checks every page on its way in (lazy mmap: once the guest
    runs); True with lazy mmap: before the guest starts; False (eager only): a QEMU >= 9.1
    target reads the file itself, fastest, its pages unchecked (the device state is).
    `resume` (with `lazy` and `qmp_address`): finish a lazy restore of this file whose
    vmsnap died, on the target it left in postcopy-paused. `populate` (with lazy="mmap"):
    QEMU makes every mapped page private while the guest runs, so the guest's first touches
    are not copy-on-write faults, at the cost of the shared page cache (README: Lazy restore).
    A file saved from a libvirt domain, with neither `qmp_address` nor `command`, is
    restored through libvirt (restore_domain, default connection; lazily by postcopy)."""
    if resume and lazy is None:
        raise VmsnapError("resume finishes a lazy restore: give lazy= too")
    if lazy is not None and verify is False:
        raise VmsnapError("a lazy restore checks every page it sends: no verify=False")
    if populate:
        if lazy != "mmap":
            raise VmsnapError("--populate goes with --lazy=mmap (it makes the pages QEMU maps "
                              "from the file private; postcopy's are the guest's own)")
        from .orchestration.populate import check_populate

        check_populate()
    launched = None
    if qmp_address is None and not resume:
        # QEMU starts first, eager or lazy, where its command line is known before the file
        # is opened, and vmsnap loads the rest of itself (numpy, QMP) and opens the file
        # while QEMU starts up (see orchestration.early: it loads only the standard library)
        from .orchestration.early import start_early

        launched = start_early(os.fspath(path), command, lazy, trust_command_line)
    try:
        return _restore(path, qmp_address=qmp_address, command=command, paused=paused,
                        reporter=reporter, direct=direct, channels=channels,
                        trust_command_line=trust_command_line, lazy=lazy, verify=verify,
                        resume=resume, populate=populate, launched=launched)
    except BaseException:
        if launched is not None:
            launched.discard()
        raise


def _restore(path: str | os.PathLike[str], *, qmp_address: str | None,
             command: Sequence[str] | None, paused: bool, reporter: Reporter | None,
             direct: bool, channels: int | None, trust_command_line: bool, lazy: str | None,
             verify: bool | None, resume: bool, populate: bool, launched: EarlyQemu | None
             ) -> RestoreResult:
    """restore() once its QEMU, if `launched` early, is starting."""
    from .fileformat.reader import open_snapshot
    from .targets import normalize

    # opened once: what is checked is what is loaded, whatever the path names meanwhile
    with open_snapshot(normalize(path), direct=direct,
                       loading=launched.loading if launched else None) as snap:
        if launched is not None and not launched.matches(snap):
            launched.discard()  # the file changed meanwhile: launch for the one opened
            launched = None
        started = launched.started if launched else None
        if qmp_address is None and not command:
            from .libvirt.image import domain_of

            if domain_of(snap.metadata) is not None:
                from .libvirt.restore import restore_domain as _restore_domain

                return _run(_restore_domain(snap, paused=paused, trust_xml=trust_command_line,
                                            reporter=reporter, lazy=lazy, channels=channels))
        if lazy is not None:
            from .orchestration.lazy import restore_lazy

            return _run(restore_lazy(snap, engine=lazy, qmp_address=qmp_address,
                                     command=command, paused=paused, reporter=reporter,
                                     verify=bool(verify), resume=resume, populate=populate,
                                     trust_command_line=trust_command_line,
                                     launched=started))
        from .orchestration.restore import restore as _restore

        return _run(_restore(snap, qmp_address=qmp_address, command=command, paused=paused,
                             reporter=reporter, channels=channels,
                             trust_command_line=trust_command_line,
                             verify=verify is not False, launched=started))


def restore_domain(path: str | os.PathLike[str], *, uri: str | None = None,
                   domain: str | None = None, xml: str | None = None, paused: bool = False,
                   trust_xml: bool = False, reporter: Reporter | None = None,
                   direct: bool = True, lazy: str | None = None,
                   channels: int | None = None) -> RestoreResult:
    """Bring a libvirt domain back from `path` through libvirt (virDomainRestore fed by vmsnap
    through a private FIFO): under the domain XML stored in the file (if this host signed it,
    or `trust_xml`), or the XML of defined domain `domain`, or `xml`. `lazy` ("auto" or
    "postcopy"): libvirt starts the domain waiting for an incoming stream (`-incoming
    defer` in its qemu namespace) and vmsnap is its postcopy source over libvirt's monitor;
    `channels` > 0: the same domain start, loaded by multifd (a directory of QEMU's user in
    its root, as for `save_domain`)."""
    from .fileformat.reader import open_snapshot
    from .libvirt.restore import restore_domain as _restore_domain

    with open_snapshot(os.path.abspath(os.fspath(path)), direct=direct) as snap:
        return _run(_restore_domain(snap, uri=uri, domain=domain, xml=xml, paused=paused,
                                    trust_xml=trust_xml, reporter=reporter, lazy=lazy,
                                    channels=channels))


def open(path: str | os.PathLike[str], *, direct: bool = True) -> Snapshot:  # noqa: A001
    """Open a snapshot for inspection (blocks, metadata, present pages, verify())."""
    from .fileformat.reader import open_snapshot

    return open_snapshot(path, direct=direct)


# -- the other verbs: files and streams, no QEMU -------------------------------------------
def info(path: str | os.PathLike[str], *, direct: bool = True) -> SnapshotInfo:
    """What the snapshot at `path` holds: blocks, sizes, origin, integrity state and the
    trust of its stored command line (`vmsnap info`)."""
    from .ops.info import describe

    return describe(path, direct=direct)


def verify(path: str | os.PathLike[str], *, direct: bool = True,
           progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Check every page and every other stream byte of `path` against its checksums
    (`vmsnap verify`); ChecksumMismatch names the first bad page."""
    with open(path, direct=direct) as snap:
        return snap.verify(progress=progress)


def receive(source: Readable, path: str | os.PathLike[str], *,
            qemu_version: str | None = None, direct: bool = True,
            progress: Callable[[int], None] | None = None) -> ReceiveStats:
    """Store the QEMU migration stream read from `source` (a binary file object: pipe,
    socket, file) as the snapshot `path`, committed atomically (`vmsnap receive`)."""
    from .fileformat.trailer import TrailerMetadata
    from .fileformat.writer import SnapshotWriter
    from .ops.receive import receive as _receive

    writer = SnapshotWriter(path, TrailerMetadata(qemu_version=qemu_version), direct=direct)
    return _receive(source, writer, progress=progress)


def send(path: str | os.PathLike[str], sink: Sink, *, direct: bool = True,
         progress: Callable[[int, int], None] | None = None) -> SendStats:
    """Write the snapshot `path` to `sink` (a binary file object over a descriptor) as a
    plain QEMU migration stream, every page checked first (`vmsnap send`)."""
    from .fileformat.reader import open_snapshot
    from .ops.send import send as _send

    with open_snapshot(path, direct=direct) as snap:
        return _send(snap, sink, progress=progress)


def seal(path: str | os.PathLike[str], *, direct: bool = True) -> int:
    """Give a file QEMU wrote itself (mapped-ram) vmsnap's checksums (`vmsnap seal`).
    Returns the pages checksummed."""
    from .fileformat.trailer import TrailerMetadata
    from .hostkey import load_key
    from .ops.seal import seal as _seal

    return _seal(os.fspath(path), TrailerMetadata(extra={"pages_by": "qemu"}), load_key(),
                 direct=direct)


def import_stream(source: str, path: str | os.PathLike[str], *, direct: bool = True,
                  progress: Callable[[int], None] | None = None
                  ) -> tuple[ReceiveStats, DomainImage | None]:
    """Store `source` (a plain QEMU stream or a libvirt save image: file or FIFO) as the
    snapshot `path` (`vmsnap import`); returns the figures and the libvirt domain, if any."""
    from .libvirt.image import import_stream as _import

    return _import(source, os.fspath(path), progress=progress, direct=direct)


def export_image(path: str | os.PathLike[str], dest: str, *, xml: str | None = None,
                 direct: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> SendStats:
    """Write the snapshot `path` as a libvirt save image to `dest` (a FIFO, written as read,
    or a file replaced atomically), under its stored domain XML or `xml`
    (`vmsnap export --libvirt`)."""
    from .libvirt.image import export_image as _export

    return _export(os.fspath(path), dest, xml=xml, direct=direct, progress=progress)
