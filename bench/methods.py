"""The contenders. Each method saves one freshly booted guest and restores it into a fresh
QEMU, returning one repetition's figures; a RAM check ends every restore, so no number comes
from a broken restore. Add a method by subclassing Method and listing it in `all_methods()`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    cached_bytes,
    file_sizes,
    qemu_usage,
    run_child,
    sync_all,
    sync_file,
)
from testbed.guests import BootGuest, shared_ram_args
from testbed.pagecache import evict
from testbed.qemu import Vm, exec_uri
from testbed.transfer import VMSNAP, migrate_parameters


@dataclass
class Scenario:
    key: str
    label: str
    make_guest: Callable[[], Any]
    qemu: str  # the QEMU the source runs on for methods that do not fix it
    live: bool
    ram_bytes: int
    used_bytes: int  # non-zero guest RAM (fio's byte count until vmsnap measured it)


@dataclass
class Context:
    root: Path  # on the disk under test
    present_bytes: dict[str, int]  # scenario key -> bytes of present pages (vmsnap info)
    libvirt: Any = None  # testbed.libvirt.Libvirtd once started, or the reason it cannot run
    libvirt_version: str | None = None
    vmsnap_env: dict[str, str] = field(default_factory=dict)  # bench.common.compiled_vmsnap


def _restored_paused(vm) -> None:
    """Every method restores the VM paused (its RAM is checked against the save before the
    guest runs); restore_s ends there, the `cont` after it (~1 ms) is not timed."""
    if (status := vm.status()) != "paused":
        raise RuntimeError(f"restored VM is {status!r}, not paused")


def dirty_rate_mb_s(vm, seconds: int = 1) -> float | None:
    """The source guest's dirty rate as QEMU measures it (calc-dirty-rate, page sampling)."""
    try:
        vm.cmd("calc-dirty-rate", **{"calc-time": seconds})
        deadline = time.monotonic() + seconds + 10
        while time.monotonic() < deadline:
            r = vm.cmd("query-dirty-rate")
            if r.get("status") == "measured":
                return r.get("dirty-rate")
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - a figure for the record, not a requirement
        pass
    return None


def _qemu_usage(before: dict[str, float] | None, after: dict[str, float] | None
                ) -> dict[str, float | None]:
    """The restore's QEMU usage between two qemu_usage readings: CPU seconds, all threads and
    the main thread's, and the guest RAM in huge pages at the end (None if a reading failed)."""
    if before is None or after is None:
        return {"restore_qemu_cpu_s": None, "restore_qemu_main_cpu_s": None,
                "restore_qemu_thp_mb": None}
    return {"restore_qemu_cpu_s": round(after["cpu_s"] - before["cpu_s"], 2),
            "restore_qemu_main_cpu_s": round(after["main_cpu_s"] - before["main_cpu_s"], 2),
            "restore_qemu_thp_mb": after["thp_mb"]}


def _describe(check: Any) -> str:
    return check if isinstance(check, str) else check.describe()


def _live_caps(live: bool) -> dict[str, bool]:
    # vmsnap turns auto-converge on for live saves; give QEMU's own paths the same help
    return {"auto-converge": True} if live else {}


class Method:
    name = "?"
    label = "?"
    qemu: str | None = None  # None: the scenario's QEMU

    def unsupported(self, scen: Scenario, ctx: Context) -> str | None:
        return None

    def run(self, scen: Scenario, ctx: Context, wd: Path) -> dict[str, Any]:
        raise NotImplementedError


class Vmsnap(Method):
    """`vmsnap save --json` / `vmsnap restore --qmp` as child processes (CPU, peak RSS)."""

    restore_args: tuple[str, ...] = ()

    def __init__(self, channels: int = 0):
        self.channels = channels
        self.name = f"vmsnap-ch{channels}"
        self.label = f"vmsnap {channels} ch"

    def _channel_args(self, verb: str) -> list[str]:
        return ["--channels", str(self.channels)]  # explicit, even 0: the default is "auto"

    def config(self, guest, scen: Scenario, wd: Path):
        return guest.config(self.qemu or scen.qemu, wd)

    def before_restore(self) -> None:
        """Runs once the source QEMU is gone, before the restore's QEMU starts."""

    def restore(self, dst: Vm, snap: Path, ctx: Context, wd: Path) -> dict[str, Any]:
        """`vmsnap restore` of `snap` into the -incoming QEMU `dst`, `snap` evicted from the
        page cache (see _qemu_load)."""
        evict(snap)
        q0 = qemu_usage(dst)
        t0 = time.monotonic()
        restore = run_child([VMSNAP, "restore", "--json", "--paused", str(snap), "--qmp",
                             str(dst.tool_qmp_path), *self._channel_args("restore"),
                             *self.restore_args],
                            env=_env(ctx, wd))
        if restore.returncode:
            raise RuntimeError(f"vmsnap restore: {restore.stderr.strip()[-400:]}")
        _restored_paused(dst)
        restore_s = time.monotonic() - t0
        used = _qemu_usage(q0, qemu_usage(dst))
        restored = _last_event(restore.stdout) or {}
        return {"restore_s": restore_s,
                # the part of restore_s from vmsnap's checks done until QEMU had loaded it all
                "restore_load_s": restored.get("load_seconds"), **used,
                "restore_cpu_s": restore.cpu_seconds,
                "restore_max_rss_bytes": restore.max_rss_bytes}

    def run(self, scen, ctx, wd):
        guest = scen.make_guest()
        config = self.config(guest, scen, wd)
        snap = wd / "vm.snap"
        with Vm(config, wd, "src") as src:
            guest.boot(src)
            rate = dirty_rate_mb_s(src) if scen.live else None
            if not scen.live:
                src.stop()
            argv = [VMSNAP, "save", "--json", "--qmp", str(src.tool_qmp_path), str(snap),
                    *(["--live"] if scen.live else []), *self._channel_args("save")]
            with guest.saving(src) as saved:  # reads RAM before and after, not measured
                sync_all()
                c0 = cached_bytes()
                save = run_child(argv, env=_env(ctx, wd))
                c1 = cached_bytes()
            if save.returncode:
                raise RuntimeError(f"vmsnap save: {save.stderr.strip()[-400:]}")
        done = _last_event(save.stdout)
        info = json.loads(subprocess.run([VMSNAP, "info", "--json", str(snap)], check=True,
                                         capture_output=True, text=True).stdout)
        ctx.present_bytes[scen.key] = int(info.get("present_bytes") or 0)
        self.before_restore()
        with Vm(config, wd, "dst", incoming="defer") as dst:
            prefault_ram(dst)
            restored = self.restore(dst, snap, ctx, wd)
            check = guest.check_restored(dst, saved)
        return {"save_s": save.seconds, **restored, **file_sizes(snap),
                "cache_growth_bytes": c1 - c0, "save_cpu_s": save.cpu_seconds,
                "save_max_rss_bytes": save.max_rss_bytes,
                "present_bytes": ctx.present_bytes[scen.key], "check": _describe(check),
                "dirty_rate_mb_s": rate,
                "vmsnap_done": done}


class Vmsnap10(Vmsnap):
    """vmsnap on QEMU 10 (4 channels): the save goes through QEMU's own mapped-ram writer and
    vmsnap's seal; the restore either checks every page on the stream path or, with
    `--no-verify`, lets QEMU read the file itself."""

    def __init__(self, verify: bool):
        super().__init__(4)
        self.qemu = "10"
        self.restore_args = () if verify else ("--no-verify",)
        self.name = "vmsnap10" + ("" if verify else "-noverify")
        self.label = "vmsnap QEMU 10" + ("" if verify else " --no-verify")


class Vmsnap10QemuLoad(Vmsnap10):
    """vmsnap10's save, then QEMU 10's own load of vmsnap's file exactly as method qemu10
    loads its own (`file:` URI, mapped-ram, multifd 4, direct-io): beside vmsnap10-noverify
    and qemu10 it tells the file's part in a slower load from vmsnap's procedure's part."""

    def __init__(self) -> None:
        super().__init__(verify=False)
        self.name = "vmsnap10-qemuload"
        self.label = "vmsnap QEMU 10 file, QEMU's load"

    def restore(self, dst, snap, ctx, wd):
        return _qemu_load(dst, snap, f"file:{snap}", Qemu10Native.caps, Qemu10Native.params)


class VmsnapShared(Vmsnap):
    """vmsnap with guest RAM in a shared /dev/shm file (memory-backend-file, share=on):
    vmsnap copies RAM between the backing and the file, QEMU streams device state only."""

    def __init__(self, qemu: str):
        super().__init__(0)
        self.qemu = qemu
        self.name = "vmsnap-shm" + ("" if qemu == "7.2" else qemu)
        self.label = f"vmsnap shared RAM, QEMU {qemu}"

    def _channel_args(self, verb: str) -> list[str]:
        return []

    def unsupported(self, scen, ctx):
        return "live saves of shared RAM use the stream path" if scen.live else None

    def config(self, guest, scen, wd):
        config = super().config(guest, scen, wd)
        config.args += shared_ram_args("file", guest.memory_mb, self._shm / "ram")
        config.binds.append(self._shm)  # the QEMU 10 chroot sees it at the same path
        return config

    def before_restore(self) -> None:
        # The restore's QEMU must create a fresh backing, as a relaunch would: reopening the
        # source's file would find every page already there (and make the RAM check moot).
        (self._shm / "ram").unlink()

    def run(self, scen, ctx, wd):
        self._shm = Path(tempfile.mkdtemp(prefix="vmsnap-bench-", dir="/dev/shm"))  # 0700
        try:
            return super().run(scen, ctx, wd)
        finally:
            shutil.rmtree(self._shm, ignore_errors=True)


def _env(ctx: Context, wd: Path) -> dict[str, str]:
    """vmsnap as installed (ctx.vmsnap_env), with its migration socket under TMPDIR: inside
    wd, a chroot QEMU 10 sees it."""
    return {**ctx.vmsnap_env, "TMPDIR": str(wd)}


def _last_event(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def prefault_ram(dst: Vm) -> None:
    """Allocate the -incoming QEMU's guest RAM before the timed restore (QEMU's `prealloc`
    on its pc.ram backend, 2 threads; the memory stays zero). On this nested host the first
    touch of memory freed more than ~1 s earlier costs 4-7 s/GiB (the kernel reports free
    pages to the outer hypervisor, which takes them back), 0.12 s/GiB right after a free:
    without this, a restore's time depended mostly on how long ago the source QEMU exited,
    i.e. on the method's place in the sequence, not on its own work. A shared backing (fresh:
    see VmsnapShared.before_restore) fills with zero pages, so vmsnap restores into pages
    that exist, as into a running VM's backing; into holes it would pwrite, paying the
    allocation inside the timed span (0.5 s for 4 GiB right after a free, 15-23 s later)."""
    dst.cmd("qom-set", path="/objects/pc.ram", property="prealloc-threads", value=2)
    dst.cmd("qom-set", path="/objects/pc.ram", property="prealloc", value=True)


def _qemu_load(dst: Vm, path: Path, uri: str, caps: dict[str, bool],
               params: dict[str, Any]) -> dict[str, Any]:
    """QEMU's own load of `uri` (reading `path`) into the -incoming QEMU `dst`, timed as
    `vmsnap restore --qmp` is: from the same start (the waiting QEMU, its capabilities and
    parameters not yet set: vmsnap sets its own inside its timed span) to the same end (the
    load's end as QEMU's MIGRATION event tells it, which is what vmsnap waits on; polling
    query-status every 50 ms, as before, added 0-50 ms to the peers' loads only). `path` is
    evicted from the page cache first; the programs stay warm, as for a tool run often (a
    full drop_caches also made vmsnap's Python start-up read its modules from disk, 50-130
    ms at 4 GiB, which the peers' loads, sent to a running QEMU, never pay;
    bench/lazy_restore.py evicts the same way)."""
    evict(path)
    q0 = qemu_usage(dst)
    t0 = time.monotonic()
    dst.set_migration({**caps, "events": True}, params or None)
    dst.cmd("migrate-incoming", uri=uri)
    _wait_loaded(dst)
    _restored_paused(dst)
    restore_s = time.monotonic() - t0
    return {"restore_s": restore_s, **_qemu_usage(q0, qemu_usage(dst))}


def _wait_loaded(dst: Vm, timeout: float = 600.0) -> None:
    """Until the -incoming QEMU `dst` (the `events` capability on) reports its load
    completed: at its MIGRATION event, as vmsnap's own wait (orchestration.target)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = dst.qmp.pull_event(wait=left)
        status = (event or {}).get("data", {}).get("status")
        if event and event["event"] == "MIGRATION" and status in ("completed", "failed"):
            if status == "failed":
                raise RuntimeError(f"incoming migration failed: {dst.log_tail()}")
            return
    raise TimeoutError(f"incoming migration not finished after {timeout}s")


class QemuMigration(Method):
    """QEMU's own migration to a file and back (-incoming defer + migrate-incoming), then
    `sync -f` so the save is durable like vmsnap's fsync'ed file."""

    def _uris(self, path: Path) -> tuple[str, str]:
        raise NotImplementedError

    caps: dict[str, bool] = {}
    params: dict[str, Any] = {}

    def run(self, scen, ctx, wd):
        guest = scen.make_guest()
        qemu = self.qemu or scen.qemu
        config = guest.config(qemu, wd)
        path = wd / "vm.img"
        out_uri, in_uri = self._uris(path)
        caps = {**self.caps, **_live_caps(scen.live)}
        with Vm(config, wd, "src") as src:
            guest.boot(src)
            rate = dirty_rate_mb_s(src) if scen.live else None
            if not scen.live:
                src.stop()
            with guest.saving(src) as saved:  # reads RAM before and after, not measured
                sync_all()
                c0 = cached_bytes()
                t0 = time.monotonic()
                info = src.migrate(out_uri, capabilities=caps,
                                   parameters={**migrate_parameters(scen.live), **self.params})
                sync_file(path)
                save_s = time.monotonic() - t0
                c1 = cached_bytes()
        with Vm(config, wd, "dst", incoming="defer") as dst:
            prefault_ram(dst)
            restored = _qemu_load(dst, path, in_uri, self.caps, self.params)
            check = guest.check_restored(dst, saved)
        ram = info.get("ram", {})
        return {"save_s": save_s, **restored, **file_sizes(path),
                "cache_growth_bytes": c1 - c0, "check": _describe(check), "qemu": qemu,
                "dirty_rate_mb_s": rate,
                "migration": {k: ram.get(k) for k in ("total", "transferred", "duplicate",
                                                      "dirty-sync-count", "dirty-pages-rate")}}


class ExecCat(QemuMigration):
    name = "exec-cat"
    label = "exec:cat+sync"

    def _uris(self, path):
        return exec_uri("cat", stdout=path), exec_uri("cat", path)


class Qemu10Native(QemuMigration):
    name = "qemu10"
    label = "QEMU10 mapped-ram 4ch dio"
    qemu = "10"
    caps = {"mapped-ram": True, "multifd": True}
    params = {"multifd-channels": 4, "direct-io": True}

    def _uris(self, path):
        return f"file:{path}", f"file:{path}"


class Virsh(Method):
    name = "virsh"
    label = "virsh --bypass-cache"

    def unsupported(self, scen, ctx):
        if not isinstance(scen.make_guest(), BootGuest):
            return "the libvirt domain runs the bootguest only"
        if scen.live:
            return "virsh save always pauses the domain: no live save"
        if ctx.libvirt is None or isinstance(ctx.libvirt, str):
            return f"libvirt unavailable: {ctx.libvirt}"
        return None

    def run(self, scen, ctx, wd):
        from testbed.libvirt import LibvirtVm

        guest = scen.make_guest()
        cfg = guest.config("7.2", wd)
        cmdline = cfg.args[cfg.args.index("-append") + 1]
        wd.chmod(0o711)  # QEMU runs as libvirt-qemu and writes its RAM dumps below wd
        vm = LibvirtVm(ctx.libvirt.conn, f"vmsnap-bench-{os.getpid()}", wd / "libvirt",
                       guest.memory_mb, cmdline)
        path = wd / "vm.virsh"
        try:
            vm.create()
            guest.boot(vm)
            vm.stop()
            with guest.saving(vm) as saved:  # reads RAM before and after, not measured
                sync_all()
                c0 = cached_bytes()
                t0 = time.monotonic()
                figures = self.save(vm, path, ctx)
                save_s = time.monotonic() - t0
                c1 = cached_bytes()
            sizes = file_sizes(path)
            self.before_restore(vm)
            evict(path)
            t0 = time.monotonic()
            figures |= self.restore(vm, path, ctx)
            _restored_paused(vm)
            restore_s = time.monotonic() - t0
            check = guest.check_restored(vm, saved)
        finally:
            vm.destroy()
        return {"save_s": save_s, "restore_s": restore_s, **sizes, "cache_growth_bytes": c1 - c0,
                "check": _describe(check), **figures}

    def save(self, vm, path: Path, ctx) -> dict[str, Any]:
        """`virsh save --bypass-cache` (its API call), made durable."""
        import libvirt

        vm.dom.saveFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE)
        sync_file(path)
        return {}

    def before_restore(self, vm) -> None:
        """virsh save ends the domain itself."""

    def restore(self, vm, path: Path, ctx) -> dict[str, Any]:
        """`virsh restore --bypass-cache --paused` (its API call)."""
        import libvirt

        ctx.libvirt.conn.restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
                                      | libvirt.VIR_DOMAIN_SAVE_PAUSED)
        return {}


class VmsnapDomain(Virsh):
    """`vmsnap save --domain` / `vmsnap restore FILE` on the same libvirt domain as `virsh`.
    0 channels: one stream through an fd libvirt passes to QEMU, the restore feeds
    virDomainRestore; N: multifd both ways (QEMU's channels meet vmsnap in a directory of
    QEMU's user in its root; the restore loads a domain libvirt started waiting)."""

    def __init__(self, channels: int = 0):
        self.channels = channels
        self.name = "vmsnap-domain" + (f"-ch{channels}" if channels else "")
        self.label = "vmsnap --domain" + (f" {channels} ch" if channels else "")

    def _vmsnap(self, ctx, path: Path, *args: str) -> dict[str, Any]:
        chans = ["--channels", str(self.channels)] if self.channels else []
        proc = run_child([VMSNAP, *args[:1], "--json", *args[1:], *chans],
                         env=_env(ctx, path.parent))
        if proc.returncode:
            raise RuntimeError(f"vmsnap {args[0]}: {proc.stderr.strip()[-400:]}")
        return {f"{args[0]}_cpu_s": proc.cpu_seconds,
                f"{args[0]}_max_rss_bytes": proc.max_rss_bytes}

    def save(self, vm, path, ctx):
        return self._vmsnap(ctx, path, "save", "--domain", vm.name, "--connect", ctx.libvirt.uri,
                            str(path))

    def before_restore(self, vm) -> None:
        vm.destroy()  # the domain stays paused after `vmsnap save`: the restore replaces it

    def restore(self, vm, path, ctx):
        return self._vmsnap(ctx, path, "restore", "--paused", str(path), "--connect",
                            ctx.libvirt.uri)


class Fio(Method):
    """The disk's limit: sequential O_DIRECT write (+ final fsync) and read of the bytes of
    present pages (measured by vmsnap earlier in the run, else the guest's used RAM)."""

    ARGS = ["--bs=1M", "--direct=1", "--ioengine=libaio", "--output-format=json"]

    def __init__(self, jobs: int = 1):
        self.jobs = jobs
        self.name = "fio" if jobs == 1 else f"fio-{jobs}j"
        self.label = "fio O_DIRECT" + (f" {jobs} jobs" if jobs > 1 else "")

    def run(self, scen, ctx, wd):
        nbytes = ctx.present_bytes.get(scen.key) or scen.used_bytes
        unit = self.jobs << 20
        nbytes = -(-nbytes // unit) * unit
        path = wd / "fio.dat"
        # one job at queue depth 16; or N jobs at depth 8, each on its own 1/N of the file
        split = [] if self.jobs == 1 else [
            f"--numjobs={self.jobs}", f"--offset_increment={nbytes // self.jobs}",
            "--group_reporting"]
        common = [f"--size={nbytes // self.jobs}", f"--filename={path}", *self.ARGS,
                  f"--iodepth={16 if self.jobs == 1 else 8}", *split]
        sync_all()
        c0 = cached_bytes()
        w = run_child(["fio", "--name=w", "--rw=write", "--end_fsync=1", *common])
        c1 = cached_bytes()
        if w.returncode:
            raise RuntimeError(f"fio write: {w.stderr.strip()[-300:]}")
        sizes = file_sizes(path)
        evict(path)
        r = run_child(["fio", "--name=r", "--rw=read", *common])
        if r.returncode:
            raise RuntimeError(f"fio read: {r.stderr.strip()[-300:]}")
        bw = {k: json.loads(x.stdout)["jobs"][0][k]["bw_bytes"]
              for k, x in (("write", w), ("read", r))}
        return {"save_s": w.seconds, "restore_s": r.seconds, **sizes,
                "cache_growth_bytes": c1 - c0, "fio_bytes": nbytes, "fio_bw_bytes": bw,
                "check": "n/a (no VM)"}


def all_methods(channels: list[int] | None = None) -> dict[str, Method]:
    """Every method by name; vmsnap gets one entry per channel count."""
    if channels is None:
        channels = [0, 2, 4]
    methods: list[Method] = [*(Vmsnap(n) for n in channels), Vmsnap10(True), Vmsnap10(False),
                             Vmsnap10QemuLoad(),
                             VmsnapShared("7.2"),
                             VmsnapShared("10"), ExecCat(), Virsh(), VmsnapDomain(),
                             VmsnapDomain(2), VmsnapDomain(4), Qemu10Native(),
                             Fio(),
                             Fio(4)]
    return {m.name: m for m in methods}
