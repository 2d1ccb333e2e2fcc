"""restore: bring a snapshot back into a QEMU started with `-incoming defer`.

With no target, vmsnap relaunches the VM from the command line stored in the file. The
snapshot is streamed in with every present page sent once; pages are checked against their
checksums before they leave, so a corrupt file makes the load fail and the guest never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import one_line
from ..fileformat.reader import Snapshot
from ..fileformat.trailer import TrailerMetadata
from ..ops.destination import Destination
from ..progress import Reporter
from . import native, shared
from . import qmp as qmpmod
from .options import check_channels
from .qmp import Client, Monitor
from .relaunch import GuardedQemu, RelaunchLock, Started, own_qmp
from .target import (
    RestoreResult,
    Target,
    check_target,
    launch_argv,
    launch_target,
    wait_loaded,
    wait_started,
)
from .vmlock import vm_lock

if TYPE_CHECKING:
    from ..ops.send import SendStats


#: Memory backends whose memory is zero when an -incoming QEMU starts (anonymous or a new
#: memfd); memory-backend-file may map a file that holds anything.
FRESH_BACKENDS = ("memory-backend-ram", "memory-backend-memfd")


@dataclass(frozen=True)
class _Survey:
    """What the restore asks of its target besides check_target, in the same round trip."""

    capabilities: dict[str, bool]  # migration capabilities and their states
    memdevs: list[dict[str, Any]]  # query-memdev
    backends: dict[str, str]  # memory backend objects, id -> QOM type (see _survey)


async def _survey(client: Monitor) -> _Survey:
    """The target's migration capabilities, memory devices and backend objects. A
    backend's RAM block is named after its id ("pc.ram" for plain -m)."""
    capabilities, memdevs, objects = await asyncio.gather(
        qmpmod.capabilities(client), client.execute("query-memdev"),
        client.execute("qom-list", {"path": "/objects"}))
    types = {o["name"]: o.get("type", "").removeprefix("child<").removesuffix(">")
             for o in objects}
    return _Survey(capabilities, memdevs,
                   {name: t for name, t in types.items() if t.startswith("memory-backend-")})


async def restore(snap: Snapshot, *, qmp_address: str | None = None,
                  command: Sequence[str] | None = None, paused: bool = False,
                  reporter: Reporter | None = None, channels: int | None = None,
                  trust_command_line: bool = False, verify: bool = True,
                  target: Target | None = None, launched: Started | None = None
                  ) -> RestoreResult:
    """Restore the open snapshot `snap` into the QEMU at `qmp_address`, or into a QEMU
    launched from `command` (default: the command line stored in the snapshot, if this
    host signed the file or `trust_command_line`; see relaunch.approve). What is checked
    and what is loaded are this one open file, whatever its path names meanwhile.
    `channels`: multifd channels (0: one plain stream; None: check_channels(None)).
    `verify=False` lets a QEMU >= 9.1 target read the file itself (see native.can_load):
    its pages are then not checked, only the device state. `target`: a QEMU another
    program started (a libvirt domain), killed if the restore fails. `launched`: the QEMU
    of `command` or of the stored command line (its relaunch lock held), started before the
    file was opened (api.restore), this call's to end or release from now on; the result's
    seconds count from its start."""
    channels = check_channels(channels)
    path = snap.path
    rep = reporter or Reporter()
    facts = _facts(snap)
    if facts.pages_pending:
        rep.note(f"page checksums of {path} are pending (vmsnap seal): pages go in "
                 "unchecked, the device state checked")
    held = _Held(launched.workdir if launched else tempfile.mkdtemp(prefix="vmsnap-"))  # 0700
    t0 = launched.at if launched else time.monotonic()
    try:
        if target is not None:
            held.proc, client, peer, qmp_address = target, target.monitor, target.peer, \
                target.label
        else:
            if qmp_address is None:
                held.argv = launch_argv(path, command, facts.meta)
                if launched is not None:
                    held.proc, held.lock = launched.proc, launched.lock
                    await wait_started(launched)
                    qmp_address = launched.qmp
                else:
                    held.proc, held.lock, qmp_address = await launch_target(
                        path, held.argv, bool(command), snap.trailer, trust_command_line,
                        held.workdir)
            client, peer = await qmpmod.connect(qmp_address)
            held.client = client
        held.stack.enter_context(vm_lock(peer.pid))
        dest, survey = await asyncio.gather(  # one round trip
            check_target(client, peer, facts.machine, facts.sizes), _survey(client))
        held.plan = plan = await shared.restore_plan(client, peer, set(facts.sizes),
                                                     survey.capabilities, survey.memdevs)
        t_load = time.monotonic()
        stats, ram_path = await _load(client, peer, snap, facts, held, dest, survey,
                                      channels, verify, rep)
        load_seconds = time.monotonic() - t_load
        run = facts.saved_running and not paused
        if run:
            await client.execute("cont")
        if held.proc is not None:  # loaded: the VM runs on without us, on its own monitor
            held.proc.release()
        if held.argv:  # launched by vmsnap: its QMP socket is ours unless it has its own
            held.keep_workdir = own_qmp(held.argv) is None
            qmp_address = own_qmp(held.argv) or qmp_address
        result = RestoreResult(path, time.monotonic() - t0, stats.stream_bytes,
                               stats.pages + (plan.pages if plan else 0),
                               "running" if run else "paused",
                               held.proc.pid if held.proc else peer.pid, qmp_address, ram_path,
                               round(load_seconds, 3))
    except BaseException as err:
        rep.error(one_line(err))
        if held.proc is not None:  # never leave a half-loaded VM we started behind
            held.proc.kill()
        raise
    finally:
        await held.release()
    rep.done(**result.__dict__)
    return result


@dataclass(frozen=True)
class _Facts:
    """What a restore needs to know of the snapshot, read (and the file checked) before
    anything is launched."""

    meta: TrailerMetadata | None
    machine: str
    saved_running: bool
    total: int  # bytes of present pages
    sizes: dict[str, int]  # RAM block sizes by name
    pages_pending: bool  # a vmsnap file whose page checksums `vmsnap seal` has yet to add


def _facts(snap: Snapshot) -> _Facts:
    meta = snap.metadata
    return _Facts(meta, snap.machine_type, meta.was_running if meta else True,
                  sum(b.present_count * b.page_size for b in snap.blocks),
                  {b.name: b.used_length for b in snap.blocks},
                  snap.trailer is not None and not snap.pages_checked)


@dataclass
class _Held:
    """What a restore holds and releases whatever happens (the QEMU it launched is killed
    on failure by the caller, released on success)."""

    workdir: str
    proc: GuardedQemu | Target | None = None
    lock: RelaunchLock | None = None
    argv: list[str] = field(default_factory=list)  # the launched QEMU's command line
    client: Client | None = None
    plan: shared.RestorePlan | None = None
    keep_workdir: bool = False  # the launched QEMU's only monitor socket is in it
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def launched(self) -> GuardedQemu | None:
        """The QEMU vmsnap launched (None for one it did not)."""
        return self.proc if isinstance(self.proc, GuardedQemu) else None

    async def release(self) -> None:
        if self.plan is not None:
            self.plan.close()
        self.stack.close()
        if self.client is not None:
            await qmpmod.disconnect(self.client)
        if self.lock is not None:
            self.lock.release()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def _load(client: Monitor, peer: qmpmod.Peer, snap: Snapshot, facts: _Facts,
                held: _Held, target: Destination, survey: _Survey, channels: int,
                verify: bool, rep: Reporter) -> tuple[SendStats, str]:
    """Bring the RAM and device state in, until QEMU has loaded them: QEMU reads the file
    itself (unverified, where it can) or vmsnap streams it. Returns the stats and the RAM
    path taken."""
    # fresh anonymous memory starts zeroed: only other blocks need their zero pages
    fresh = {name for name, t in survey.backends.items() if t in FRESH_BACKENDS}
    stale = set(facts.sizes) & (set(survey.backends) - fresh)  # e.g. a file of old data
    loaded = functools.partial(wait_loaded, client, held.launched)
    if not verify and not held.plan and await native.can_load(
            client, peer, snap.path, stale, survey.capabilities):
        stats = await native.load(client, snap, channels or 1, rep, facts.total,
                                  survey.capabilities, loaded)
        return stats, "qemu"
    from .streamed import load_stream  # the stream path's machinery: only if it is taken

    stats = await load_stream(client, peer, snap, channels, held.plan, fresh, target, rep,
                              facts.total, held.stack, held.launched, survey.capabilities)
    await loaded()
    return stats, "shared" if held.plan else "stream"
