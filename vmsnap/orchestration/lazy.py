"""restore --lazy: the guest runs first, its RAM follows.

Engine "postcopy" (any QEMU with postcopy-ram, 7.2 included, every kind of target): vmsnap
is the destination's postcopy source (vmsnap.ops.postcopy_send). `cont` is issued while
the target is still `inmigrate`, which makes QEMU start the guest the moment it has the
device state (POSTCOPY_RUN); pages then arrive on demand and in the background. Where QEMU
has postcopy-preempt, requested pages go on its second channel, never behind pushed ones:
QEMU then listens (rendezvous.incoming_listener) and vmsnap connects the main channel, then
the preempt one; without a place QEMU can listen, one channel (the result says which).
A page failing its checksum is never sent and the stream is cut (a --qmp target is left
in postcopy-paused, its vCPUs waiting for the pages they lack; a QEMU vmsnap launched is
ended); no failure sends `stop`, which could wedge QEMU's monitor. Once the guest runs,
an interrupt does not stop vmsnap: the guest needs every page, so the restore finishes and
says so. If vmsnap dies, the target stays in postcopy-paused (vCPUs wait for their pages,
nothing spins).

Engine "mmap" (QEMU >= 8.2, vmsnap launches QEMU): pc.ram is mapped privately from the file
(vmsnap.orchestration.mapped); the stream carries the rest. Pages are checked in the
background once the guest runs, read through the page cache and left there (the guest's
faults find them; the disk is read once), and a mismatch stops the guest and ends the QEMU
vmsnap launched; `verify=True` checks every page before the guest starts. An interrupt during
the background check leaves the guest running, unchecked, and says so; QEMU ending during
it ends vmsnap with an error saying so. Either stops the check. `populate=True`: QEMU
also copies every mapped page privately while the guest runs (orchestration.populate).

"auto" picks postcopy (see mapped.pick_engine). A remote snapshot (rbd:, s3://) cannot be
mapped: postcopy serves its page requests by ranged reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from .. import targets
from ..errors import VmsnapError, one_line
from ..fileformat.errors import ChecksumMismatch, CorruptTrailer
from ..fileformat.hot import hot_path, load_hot, prefetch_hot, save_hot
from ..fileformat.reader import Snapshot
from ..io.sockets import widen
from ..ops.send import SendStats, send
from ..progress import Reporter
from . import futures
from . import qmp as qmpmod
from .mapped import MAPPED_BLOCK, mapped_argv, pick_engine
from .modes import USERFAULTFD, clean_capabilities
from .populate import populate as populate_pages
from .qmp import Client, Monitor
from .relaunch import GuardedQemu, RelaunchLock, Started, own_qmp
from .rendezvous import Meeting, connect_incoming, incoming_listener, pass_socket
from .target import (
    POLL,
    RestoreResult,
    Target,
    check_target,
    launch_argv,
    launch_target,
    wait_loaded,
    wait_started,
)

if TYPE_CHECKING:  # loaded by the postcopy engine only, in its preparing thread (_Job.prepare)
    from ..ops.postcopy_send import PostcopySource, PostcopyStats

T = TypeVar("T")

log = logging.getLogger(__name__)
RUNNING_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
#: GIL switch interval while other threads work (preparing, then serving pages): QMP's answers
#: and page requests must not wait 5 ms (Python's default) for them to let go of the
#: interpreter
SWITCH_INTERVAL = 0.0002
#: QEMU 8.0 and 8.1 end a postcopy-preempt restore without waiting for the requested pages
#: still on the preempt channel (fixed in 8.2 by "migration: Fix race that dest preempt
#: thread close too early"); 7.x waits for an EOS on it (vmsnap sends one)
PREEMPT_RACY = ((8, 0, 0), (8, 2, 0))
PREEMPT_EOS_BEFORE = (8, 0, 0)


@dataclass
class LazyRestoreResult(RestoreResult):
    engine: str = "postcopy"
    running_seconds: float | None = None  # command start -> guest running
    requests: int = 0
    requested_pages: int = 0
    zero_pages: int = 0
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    hot_pages: int = 0  # pages of the hint sent first (mmap: read ahead)
    already_received: int = 0  # --resume: file pages the target had before this vmsnap came
    preempt: bool = False  # postcopy: requested pages on QEMU's postcopy-preempt channel
    preempt_pages: int = 0  # pages sent there
    from_memory: int = 0  # requests answered from pages read ahead (no read of their own)
    ahead_pages: int = 0  # pages sent ahead of runs of requests in address order, with them
    interrupted: bool = False
    verified: bool = False  # mmap: every mapped page checked (before or after the start)
    populated_seconds: float | None = None  # mmap --populate: QEMU's copying every page


async def _wait_running(client: Monitor, t0: float) -> float:
    """Seconds from `t0` until the guest runs: QEMU's RESUME event (the target waits for
    an incoming stream, so it is this one's start), else asked at its MIGRATION events
    (qmp.watch; a monitor without events, every POLL)."""
    deadline = time.monotonic() + RUNNING_TIMEOUT
    async with qmpmod.watch(client, ("RESUME", "MIGRATION"), POLL) as changes:
        while True:
            state, info = await asyncio.gather(client.execute("query-status"),
                                               qmpmod.migration_status(client))
            if state["status"] == "running":
                return time.monotonic() - t0
            if info.get("status") == "failed":
                raise VmsnapError("target QEMU rejected the snapshot" + (
                    f": {info['error-desc']}" if info.get("error-desc") else ""))
            if time.monotonic() > deadline:
                raise VmsnapError(f"the guest did not start within {RUNNING_TIMEOUT:.0f}s")
            if await changes.wait(deadline - time.monotonic()) == "RESUME":
                return time.monotonic() - t0


async def _after_cut(client: Monitor) -> str:
    """What the target does once its postcopy stream is cut: its migration status once it
    left postcopy-active (or after STOP_TIMEOUT), "postcopy-paused" being where `--resume`
    can take it up; "gone" if its monitor closed (QEMU ended), "" if it did not answer."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        try:
            status = str((await asyncio.wait_for(qmpmod.migration_status(client),
                                                 STOP_TIMEOUT)).get("status"))
        except qmpmod.QemuGoneError:
            return "gone"
        except Exception:  # noqa: BLE001 - stuck (the timeout), or refused: nothing to tell
            return ""
        if status != "postcopy-active" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(POLL)


def _paused(err: Exception, path: str, qmp: str) -> VmsnapError:
    """`err` saying that the --qmp target it left waits in postcopy-paused, and what for:
    `--resume` (a file that reads again), or nothing (a bad page, or a damaged chunk of
    the checksum tables: this file cannot finish the restore)."""
    if isinstance(err, ChecksumMismatch | CorruptTrailer):
        text = (f"{one_line(err)}: not sent; the guest waits in postcopy-paused for the "
                "pages it lacks, which this file cannot give (end that QEMU)")
        if isinstance(err, CorruptTrailer):
            return CorruptTrailer(text)
        return ChecksumMismatch(text, block=err.block, offset=err.offset,
                                file_offset=err.file_offset)
    return VmsnapError(f"{one_line(err)}; the guest waits in postcopy-paused: `vmsnap "
                       f"restore {path} --lazy --resume --qmp {qmp}` finishes the restore")


async def _stop_guest(client: Monitor, command: str = "stop") -> None:
    """Stop the vCPUs (or `quit`); a vCPU waiting on a page that never comes may keep QEMU
    from answering, in which case the guest is stuck on that page and runs no further."""
    try:
        await asyncio.wait_for(client.execute(command), STOP_TIMEOUT)
    except Exception:  # noqa: BLE001 - best effort on a failing path (incl. the timeout)
        pass


async def restore_lazy(snap: Snapshot, *, engine: str = "auto",
                       qmp_address: str | None = None, command: Sequence[str] | None = None,
                       paused: bool = False, reporter: Reporter | None = None,
                       hot: bool = True, verify: bool = False,
                       trust_command_line: bool = False, resume: bool = False,
                       target: Target | None = None, started: float | None = None,
                       launched: Started | None = None, populate: bool = False
                       ) -> LazyRestoreResult:
    """Restore the open snapshot `snap` lazily: the guest runs as soon as its device state
    is in, RAM follows. Targets (and trust of a stored command line) as for `restore`
    (which also says why the file is opened once, by the caller). `hot` (postcopy): send
    the pages the last lazy restore saw requested first, and record this one's. `verify`
    (mmap): check every page before the guest starts. `populate` (mmap): have QEMU make
    every page private while the guest runs (api.restore checked the kernel). `resume`
    (postcopy, --qmp): finish a lazy restore of this same file whose vmsnap died, on the
    target it left in postcopy-paused. `target`: a QEMU another program started (postcopy
    only); `started`: when the restore began (time.monotonic()), if before this call (the
    target's start). `launched`: the QEMU of `command` or of the stored command line (for
    the engine `engine` picks, its relaunch lock held), already starting, this call's to
    end or release from now on."""
    t0 = launched.at if launched else time.monotonic() if started is None else started
    path = snap.path
    rep = reporter or Reporter()
    meta = snap.metadata
    saved_running = meta.was_running if meta else True
    run = saved_running and not paused
    workdir = launched.workdir if launched else tempfile.mkdtemp(prefix="vmsnap-")  # 0700
    job = _Job(snap, rep, t0, run, hot, populate=populate)
    switch_interval = sys.getswitchinterval()
    keep_workdir = False
    try:
        if resume and (qmp_address is None or engine == "mmap"):
            raise VmsnapError("--resume finishes a postcopy lazy restore into a waiting QEMU: "
                              "give --qmp SOCKET (and --lazy or --lazy=postcopy)")
        own = qmp_address is None and target is None  # vmsnap launches QEMU
        argv = launch_argv(path, command, meta) if own else None
        job.engine = pick_engine(engine, snap, argv, targets.remote(snap.path))
        if launched is not None:  # see api.restore
            job.proc, job.lock = launched.proc, launched.lock
        log.debug("lazy restore of %s: engine %s (asked %s), %s", path, job.engine, engine,
                  "resume" if resume else "relaunch" if argv else "into a waiting QEMU")
        # from here on threads work beside the one talking to QEMU (the preparing one,
        # then the pushers), which must not wait 5 ms for them at each answer
        sys.setswitchinterval(SWITCH_INTERVAL)
        if verify and job.engine == "mmap":
            rep.start("verify", None)
            snap.verify()
            job.verified = True
        if job.engine == "postcopy":
            job.prepare()  # while QEMU starts (or we connect to it)
        elif hot:
            job.prefetch()
        if target is not None:
            job.proc, job.client, peer, address = target, target.monitor, target.peer, \
                target.label
        else:
            if argv is None:
                assert qmp_address is not None  # nothing to launch: a target was given
                address = qmp_address
            elif launched is not None:
                await wait_started(launched)
                address = launched.qmp
            else:
                job.proc, job.lock, address = await _launch(
                    job, path, argv, bool(command), trust_command_line, workdir)
            job.client, peer = await qmpmod.connect(address)
        if not resume:  # and the migration capabilities, in the same round trip
            _, job.caps = await asyncio.gather(
                check_target(job.client, peer, snap.machine_type,
                             {b.name: b.used_length for b in snap.blocks}),
                qmpmod.capabilities(job.client))
        job.pid = job.proc.pid if job.proc else peer.pid
        job.qmp = address
        if resume:
            result = await _postcopy_resume(job, peer)
        elif job.engine == "postcopy":
            result = await _postcopy(job, peer)
        else:
            result = await _mmap(job)
        if job.proc is not None and argv is not None:
            keep_workdir = own_qmp(argv) is None  # else our socket is its only monitor
            result.qmp = own_qmp(argv) or result.qmp
    except BaseException as err:
        failure = await job.fail(err)
        if failure is not err:
            raise failure from err
        raise
    finally:
        sys.setswitchinterval(switch_interval)
        await job.settle()  # the preparing thread reads the file: done before it closes
        if isinstance(job.client, Client):
            await qmpmod.disconnect(job.client)
        if job.lock is not None:
            job.lock.release()
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rep.done(**result.__dict__)
    return result


@dataclass
class _Job:
    """One lazy restore in progress, and what to undo when it fails."""

    snap: Snapshot
    rep: Reporter
    t0: float
    run: bool
    hot: bool
    engine: str = "postcopy"
    proc: GuardedQemu | Target | None = None  # ended on failure until released
    lock: RelaunchLock | None = None
    client: Monitor | None = None
    pid: int | None = None
    qmp: str = ""
    source: PostcopySource | None = None
    preparing: asyncio.Future[PostcopySource] | None = None
    prefetching: asyncio.Future[int] | None = None
    caps: dict[str, bool] | None = None  # the target's migration capabilities
    guest_started: bool = False  # mmap: from here on, the guest lives without vmsnap
    verified: bool = False
    populate: bool = False

    def prepare(self) -> None:
        """Make the postcopy source (its module, hot-page hint, page index, stream
        prologue: work that grows with RAM size) in a thread, while vmsnap talks to the
        target (mostly waiting for QEMU's answers)."""
        def source() -> PostcopySource:
            from ..ops.postcopy_send import PostcopySource

            hint = load_hot(self.snap) if self.hot else {}
            return PostcopySource(self.snap, hot=hint, progress=self.rep.update)

        self.preparing = asyncio.get_running_loop().run_in_executor(None, source)

    def prefetch(self) -> None:
        """mmap: have the kernel read the hinted pages of the mapped block into the page
        cache while QEMU starts, so the guest's first touches of them do not each wait for
        the disk (the file is mapped, not read by vmsnap)."""
        self.prefetching = asyncio.get_running_loop().run_in_executor(
            None, prefetch_hot, self.snap, (MAPPED_BLOCK,))

    async def settle(self) -> None:
        """Wait for a preparation nobody took (a restore that failed first), and for the
        prefetch (it reads the file, which closes after)."""
        if self.prefetching is not None:
            await asyncio.wait([self.prefetching])
        if self.preparing is not None and self.source is None:
            await asyncio.wait([self.preparing])
            futures.retrieve(self.preparing)  # the restore's own error is reported

    async def fail(self, err: BaseException) -> BaseException:
        """Report `err` and undo what must be; what to raise: `err`, or an error that also
        says the guest waits for `--resume` (a --qmp target left in postcopy-paused by a
        failure another vmsnap can get past, such as a file that became unreadable)."""
        if self.guest_started:  # the guest no longer depends on vmsnap
            if not isinstance(err, Exception):  # an interrupt: said in the one line
                err = KeyboardInterrupt("the guest runs on, its pages not all checked")
            elif self.client is not None and not isinstance(err, qmpmod.QemuGoneError):
                await _stop_guest(self.client)  # mmap: a bad page, the guest must not go on
                if self.proc is not None:
                    await _stop_guest(self.client, "quit")
            self.rep.error(one_line(err))
            return err
        # postcopy: never `stop` (a bad page too, which is never sent: a vCPU that needs it
        # waits for it): its vCPUs wait for the pages they lack, as when vmsnap is killed,
        # and a `stop` waits for each vCPU to pause, which one waiting for its page may
        # never do, wedging QEMU's monitor for good (seen on this nested host)
        state = ""
        if self.source is not None:
            self.source.abort()  # a --qmp target pauses in postcopy-paused
            if self.client is not None and self.source.threads and isinstance(err, Exception):
                state = await _after_cut(self.client)
        if self.proc is not None:
            self.proc.kill()
        if state == "gone" and not isinstance(err, qmpmod.QemuGoneError):
            err = qmpmod.QemuGoneError(f"QEMU ended during the lazy restore: the guest is "
                                       f"gone ({one_line(err)})")
        elif state == "postcopy-paused" and self.proc is None and isinstance(err, Exception):
            err = _paused(err, self.snap.path, self.qmp)
        self.rep.error(one_line(err))
        return err

    def release(self) -> None:
        """The guest no longer needs vmsnap: a QEMU it launched outlives it from now on."""
        self.guest_started = True
        if self.proc is not None:
            self.proc.release()

    def result(self, stream_bytes: int, pages: int, running: float | None
               ) -> LazyRestoreResult:
        return LazyRestoreResult(
            self.snap.path, time.monotonic() - self.t0, stream_bytes, pages,
            "running" if self.run else "paused", self.pid, self.qmp, engine=self.engine,
            running_seconds=running, verified=self.verified)


@dataclass
class _Channels:
    """The postcopy stream's connections to the target: main, and postcopy-preempt's."""

    main: socket.socket
    preempt: socket.socket | None = None
    preempt_eos: bool = False  # see postcopy_send: QEMU < 8.0 waits for an EOS on it

    def close(self) -> None:
        for sock in (self.main, self.preempt):
            if sock is not None:
                sock.close()


def _preempt_refusal(caps: dict[str, bool], peer: qmpmod.Peer) -> str | None:
    """Why a postcopy restore into this QEMU goes on one channel (None: with preempt)."""
    if "postcopy-preempt" not in caps:
        return f"QEMU {peer.version_text} has no postcopy-preempt"
    if PREEMPT_RACY[0] <= peer.version < PREEMPT_RACY[1]:
        return f"QEMU {peer.version_text} may drop requested pages at the end of a preempt restore"
    return None


async def _connect_pair(client: Monitor, peer: qmpmod.Peer,
                        listener: tuple[Meeting, str, str], command: str) -> _Channels:
    """Have the target listen (`command`: migrate-incoming or migrate-recover), then connect
    its main channel and its preempt channel, in that order (QEMU 7.2 to 10.0 tell them
    apart by it; 7.x starts loading only once both are in)."""
    meeting, uri, path = listener
    try:
        await client.execute(command, {"uri": uri})
        main = await connect_incoming(client, path)
        try:
            widen(main)  # as the one-channel socket pair: 8 MiB
            preempt = await connect_incoming(client, path)
        except BaseException:
            main.close()
            raise
    finally:
        meeting.close()  # the connections outlive the path
    log.debug("postcopy: main and preempt channels connected to %s (%s)", uri, command)
    return _Channels(main, preempt, peer.version < PREEMPT_EOS_BEFORE)


async def _incoming(client: Monitor, command: str = "migrate-incoming") -> socket.socket:
    """The stream's socket, handed to QEMU by fd and given to `command` (or
    migrate-recover): no path, so a QEMU in another mount namespace or running as another
    user takes it too."""
    sock, uri = await pass_socket(client)
    try:
        await client.execute(command, {"uri": uri})
    except BaseException:
        sock.close()
        raise
    return sock


async def _launch(job: _Job, path: str, argv: list[str], given: bool,
                  trust_command_line: bool, workdir: str,
                  ) -> tuple[GuardedQemu, RelaunchLock | None, str]:
    """Launch the target QEMU; the mmap engine's maps the very file vmsnap opened and
    checked (a descriptor it inherits), never what the path names when QEMU starts."""
    trailer = job.snap.trailer
    if job.engine != "mmap":
        return await launch_target(path, argv, given, trailer, trust_command_line, workdir)
    fd = job.snap.reopen(os.O_RDONLY)
    try:
        return await launch_target(path, argv, given, trailer, trust_command_line, workdir,
                                   mapped_argv(argv, job.snap, fd), pass_fds=(fd,))
    finally:
        os.close(fd)  # QEMU holds its own


async def _postcopy(job: _Job, peer: qmpmod.Peer) -> LazyRestoreResult:
    client = job.client
    assert client is not None
    caps = job.caps
    assert caps is not None  # asked with the target's checks
    if "postcopy-ram" not in caps:
        raise VmsnapError(f"QEMU {peer.version_text} has no postcopy-ram: restore "
                          "without --lazy")
    why = _preempt_refusal(caps, peer)
    listener = None
    if why is None:
        try:
            listener = await incoming_listener(client, peer.version, peer.pid)
        except (VmsnapError, OSError) as err:
            why = one_line(err)
    if why is not None:
        log.info("postcopy on one channel: %s", why)
    try:
        try:
            await qmpmod.set_capabilities(client, {
                **clean_capabilities(), "postcopy-ram": True,
                "postcopy-preempt": listener is not None}, caps)
        except qmpmod.QmpCommandError as err:  # QEMU checks userfaultfd here
            raise VmsnapError(f"QEMU {peer.version_text} cannot use postcopy here "
                              f"({err.desc}): it needs {USERFAULTFD}; restore without "
                              "--lazy") from err
        channels = (await _connect_pair(client, peer, listener, "migrate-incoming")
                    if listener is not None else _Channels(await _incoming(client)))
    except BaseException:
        if listener is not None:
            listener[0].close()
        raise
    if job.run:  # while inmigrate: QEMU starts the guest itself at POSTCOPY_RUN
        await client.execute("cont")
    return await _serve(job, channels, resume=False)


async def _postcopy_resume(job: _Job, peer: qmpmod.Peer) -> LazyRestoreResult:
    """Finish a postcopy restore whose vmsnap died: QEMU's postcopy recovery gives the
    paused target a new channel (`migrate-recover`, by fd), on which this vmsnap asks which
    pages it has and sends the others; a target restoring with postcopy-preempt (which
    cannot be switched off now) listens for a new main and preempt channel instead."""
    client = job.client
    assert client is not None
    status = (await qmpmod.migration_status(client)).get("status")
    if status != "postcopy-paused":
        raise VmsnapError(f"--resume finishes a lazy restore whose vmsnap died, on a target "
                          f"left in postcopy-paused; this target's migration is {status!r}")
    if not (await qmpmod.capabilities(client)).get("postcopy-preempt"):
        return await _serve(job, _Channels(await _incoming(client, "migrate-recover")),
                            resume=True)
    listener = await incoming_listener(client, peer.version, peer.pid)
    return await _serve(job, await _connect_pair(client, peer, listener, "migrate-recover"),
                        resume=True)


async def _serve(job: _Job, channels: _Channels, resume: bool) -> LazyRestoreResult:
    """Be the postcopy source on `channels` until every page is in and the target says so."""
    client, rep = job.client, job.rep
    assert client is not None
    assert job.preparing is not None
    try:
        source = job.source = await job.preparing
    except BaseException:
        channels.close()
        raise
    preempt = channels.preempt is not None
    rep.start("restore", None if resume else source.total, engine=job.engine, lazy=True,
              resume=resume, preempt=preempt)
    loop = asyncio.get_running_loop()
    steadfast = _Steadfast(source, rep)  # from the first byte on, the guest needs them all
    await steadfast.wait(loop.run_in_executor(
        None, source.resume if resume else source.start, channels.main, channels.preempt,
        channels.preempt_eos))
    running = (await steadfast.wait(_wait_running(client, job.t0)) if job.run and not resume
               else None)
    rep.event("running", seconds=running)
    stats: PostcopyStats = await steadfast.wait(loop.run_in_executor(None, source.wait))
    await wait_loaded(client)
    if resume and job.run and not (await client.execute("query-status"))["running"]:
        await client.execute("cont")  # stopped meanwhile (by hand; older vmsnaps, at a bad page)
    job.release()
    if job.hot and stats.requested:
        try:
            save_hot(job.snap, stats.requested, source.hot)
        except OSError as err:  # only a hint for next time: the restore is done all the same
            rep.note(f"warning: hot pages not recorded in {hot_path(job.snap.path)} "
                     f"({err.strerror or one_line(err)}); the snapshot is untouched")
    lat = np.asarray(stats.latencies_us)
    return dataclasses.replace(
        job.result(stats.stream_bytes + stats.preempt_bytes, stats.pages, running),
        requests=stats.requests, preempt=preempt, preempt_pages=stats.preempt_pages,
        from_memory=stats.from_memory, ahead_pages=stats.ahead_pages,
        requested_pages=stats.requested_pages, zero_pages=stats.zero_pages,
        latency_p50_us=float(np.percentile(lat, 50)) if lat.size else None,
        latency_p99_us=float(np.percentile(lat, 99)) if lat.size else None,
        hot_pages=int(sum(len(v) for v in source.hot.values())), interrupted=steadfast.interrupted,
        already_received=stats.already_received)


@dataclass
class _Steadfast:
    """Once the postcopy stream starts, the target's guest needs every page from vmsnap
    (stopping would leave it waiting in postcopy-paused): an interrupt is noted and the
    restore goes on to the end; only a failure ends it early."""

    source: PostcopySource
    rep: Reporter
    interrupted: bool = False

    async def wait(self, step: Awaitable[T]) -> T:
        done = asyncio.ensure_future(step)
        while True:
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                if self.interrupted or done.done():
                    done.cancel()
                    raise
                self.interrupted = True
                left = (self.source.total - self.source.done) >> 20
                self.rep.note(f"interrupt: not stopping, the guest needs every page: "
                              f"finishing the lazy restore first ({left} MiB left)")


async def _mmap(job: _Job) -> LazyRestoreResult:
    client, rep = job.client, job.rep
    assert client is not None
    await qmpmod.set_capabilities(client, clean_capabilities(), job.caps)
    sock = await _incoming(client)
    rep.start("restore", None, engine=job.engine, lazy=True)
    loop = asyncio.get_running_loop()

    def stream() -> SendStats:
        with sock, sock.makefile("wb", buffering=0) as sink:
            return send(job.snap, sink, skip={MAPPED_BLOCK})

    stats = await loop.run_in_executor(None, stream)
    await wait_loaded(client)
    job.guest_started = True  # from here on the guest lives without vmsnap
    released = loop.run_in_executor(None, job.release)  # waits for the guard to end
    running = None
    if job.run:  # the stream's own run state is the paused source's
        await client.execute("cont")  # answered once the vCPUs run (or refused)
        running = time.monotonic() - job.t0
    rep.event("running", seconds=running)
    await released
    populating = asyncio.ensure_future(populate_pages(
        client, job.snap.block(MAPPED_BLOCK).used_length)) if job.populate else None
    try:
        if not job.verified:  # the guest runs meanwhile; a bad page stops it
            try:
                await _check_mapped(job, client, populating)
            except Exception as err:
                if populating is not None and not isinstance(err, qmpmod.QemuGoneError):
                    await asyncio.wait([populating])  # QEMU answers the `stop` only then
                raise
            job.verified = True
        populated = await _populated(job, populating) if populating is not None else None
    finally:
        if populating is not None:
            futures.retrieve(populating)
    hot = await job.prefetching if job.prefetching is not None else 0
    return dataclasses.replace(job.result(stats.stream_bytes, stats.pages, running),
                               hot_pages=hot, populated_seconds=populated)


async def _check_mapped(job: _Job, client: Monitor,
                        populating: asyncio.Future[float] | None) -> None:
    """Check every mapped page against its checksum while the guest runs (a bad one raises:
    job.fail stops the guest). The check ends with QEMU, which it does not otherwise read
    from (QemuGoneError: the guest is gone, its pages not all checked), and at an interrupt
    (job.fail says the guest runs on unchecked), instead of reading the rest of the file."""
    others = [b.name for b in job.snap.blocks if b.name != MAPPED_BLOCK]  # sent checked
    stop = threading.Event()
    check = asyncio.get_running_loop().run_in_executor(
        None, lambda: job.snap.verify(skip=others, warm=True, stop=stop))
    gone = asyncio.ensure_future(qmpmod.closed(client) if isinstance(client, Client)
                                 else asyncio.Event().wait())
    try:
        await asyncio.wait((check, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        gone.cancel()
        await asyncio.wait([check])
    checked = check.result()  # raises for a bad page, or the file unreadable
    mapped = job.snap.block(MAPPED_BLOCK)
    if checked.pages == mapped.present_count:
        return
    if populating is not None:  # QEMU ended while it copied too: populate's word for it
        await asyncio.wait([populating])
        if isinstance(populating.exception(), qmpmod.QemuGoneError):
            populating.result()
    raise qmpmod.QemuGoneError(
        f"QEMU ended while vmsnap checked the guest's pages in the background: the guest is "
        f"gone, its pages not all checked ({checked.bytes >> 20} of "
        f"{mapped.present_count * mapped.page_size >> 20} MiB)")


async def _populated(job: _Job, populating: asyncio.Future[float]) -> float | None:
    """The seconds QEMU took to make every page private; None if it could not (the guest is
    fine: a page not copied yet is copied at its first write, as without --populate)."""
    try:
        return await populating
    except qmpmod.QemuGoneError:
        raise
    except VmsnapError as err:  # refused (out of memory?) or still at it after the timeout
        job.rep.note(f"--populate: {one_line(err)}; the guest runs on, each page copied at "
                     "its first write")
        return None
