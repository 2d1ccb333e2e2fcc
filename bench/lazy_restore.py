"""Lazy restore (postcopy, mmap) next to eager vmsnap restore and QEMU 10's native
mapped-ram load, in one run, interleaved, cold cache.

    sudo .venv/bin/python bench/lazy_restore.py [--sizes 1024,4096,8192] [--reps 3]
                                                [--fill 0.9] [--dir /var/tmp/vmsnap-lazy]
                                                [--qemu 10|7.2] [--ws-mb N]
                                                [--guest boot|linux]

Per size: a bootguest (QEMU 10 or 7.2; 7.2 runs eager and postcopy only, having neither
memory-backend-file offset= nor mapped-ram; KVM, mode=random, `limit_mb` = fill x RAM,
`beat=1`: a heartbeat after every full pass over its pages) is booted and saved once with
`vmsnap save --quit`, to a file of its own. Each repetition then runs every method at every
size, sizes and methods mixed in a new order (seeded shuffle; each run records the one before
it, "after"), each into a freshly launched QEMU (`vmsnap restore FILE ... -- ARGV`; the
native one is started by the bench), the snapshot file evicted from the page cache first (the
programs stay warm: a full drop_caches makes Python's and QEMU's own start-up dominate), and
checks the guest's RAM afterwards (one-moving-edge rule, read 64 MiB at a time: the bench
stays small whatever the guest's size). vmsnap runs as `python -m vmsnap` with its modules
compiled beforehand, as an installed vmsnap runs (bench.common.vmsnap_env):

  eager         vmsnap restore (multifd, default channels)
  postcopy      vmsnap restore --lazy=postcopy, FILE.hot removed first
  postcopy-paused  the same with --paused: the guest stays paused until every page is in
                (no page requests, no vCPU taking a core: vmsnap's and QEMU's own push
                rate; no "running" or heartbeat, RAM checked as left paused)
  postcopy-hot  the same with the FILE.hot the previous postcopy run recorded
  postcopy-live (--ws-mb) the same with the FILE.hot the live save recorded: the pages it
                saw re-dirtied in its last rounds (with --ws-mb the save is `--live`)
  mmap          vmsnap restore --lazy=mmap (background checksum pass included in "done"),
                FILE.hot removed first
  mmap-populate the same with --populate: QEMU makes every mapped page private while the
                guest runs ("populate": how long that took, QEMU's main loop held)
  stored        (QEMU 7.2) vmsnap restore --lazy FILE: the command line stored in the file,
                run once its signature checked, FILE.hot removed first (the testbed's QEMU 10
                runs through a chroot wrapper, which a stored command line may not run)
  mmap-live     (--ws-mb) the same with the live save's FILE.hot: its pages are read ahead
                into the page cache while QEMU starts
  qemu10        QEMU 10 `migrate-incoming file:FILE` with mapped-ram, multifd 4, direct-io

Figures, all from the command's start (spawn of vmsnap, or of QEMU for qemu10):
  running   the guest's vCPUs run (vmsnap's "running" event as it arrives; qemu10:
            query-status)
  beat      first heartbeat: the guest ended the pass over its pages that the save
            interrupted (the pages from where it was to the end of RAM)
  full pass the second heartbeat: the guest's first full pass over all its pages made
            wholly after the restore (with --ws-mb: over its working set)
  done      the command ended: postcopy = every page resident; eager/qemu10 = loaded and
            running; mmap = background check of every mapped page finished
            (--ws-mb N: a guest whose working set is N MiB of pages scattered over its RAM,
            bootguest ws_mb=N; beat=1 makes a heartbeat after every pass over them)
  populate  mmap-populate: seconds QEMU took to make every mapped page private
  cpu       CPU seconds (user+system) of vmsnap and its QEMU until done (QEMU: all its
            threads, so a lazy restore's running vCPU too); the JSON splits it into
            cpu_vmsnap and cpu_qemu
  p50/p99   postcopy page-request latency (receipt of the request -> page sent), us
  requests  postcopy page requests (pages the guest touched before they were pushed); the
            JSON also has ahead_pages (sent ahead of runs of requests) and from_memory
            (requests answered from pages read ahead)

--guest linux: the Linux guest (TCG here) instead, memfill filling `fill` x RAM (default
0.75: the kernel and initramfs need the rest), saved paused; methods eager, postcopy and
mmap (QEMU 10). The bench holds the restored VM's serial console from its spawn; as the
guest runs it sends PING, then on PONG a full VERIFY (memfill checks every page it filled,
while a lazy restore still brings pages in), which must pass:
  pong      command start -> the guest answered PING (sent on the "running" event; eager:
            when the command ended; qemu10: after `cont`)
  verified  command start -> VERIFY OK
  verify s  VERIFY's own duration (sent -> OK); the table adds its ratio to eager's
Medians of the repetitions; under the table, per method, how its time to running depends
on RAM size (largest over smallest median, least-squares slope in ms per GiB with a 95 %
bootstrap interval: a few slow restores move it less than they move two medians). JSON with
every repetition in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import evict_file, qemu_usage, timed_restore, vmsnap_env  # noqa: E402
from testbed.guests import BootGuest, LinuxGuest, Saved  # noqa: E402
from testbed.qemu import Vm  # noqa: E402
from testbed.serial import SerialConsole  # noqa: E402

METHODS = ("eager", "postcopy", "postcopy-paused", "postcopy-hot", "mmap", "mmap-populate",
           "qemu10")
METHODS_72 = ("eager", "postcopy", "postcopy-paused", "postcopy-hot", "stored")
#: --ws-mb: also the hint a live save records (the pages re-dirtied in its last rounds)
METHODS_WS = ("postcopy-live", "mmap-live")
METHODS_LINUX = {"10": ("eager", "postcopy", "mmap"), "7.2": ("eager", "postcopy")}


class Beat:
    """Watch a VM's serial socket from its spawn; note when the first `count` heartbeats
    come."""

    def __init__(self, path: Path, count: int) -> None:
        self.at: list[float] = []
        self.count = count
        self.console: SerialConsole | None = None
        self.thread = threading.Thread(target=self._watch, args=(path,), daemon=True)
        self.thread.start()

    def _watch(self, path: Path) -> None:
        self.console = SerialConsole(path, connect_timeout=120)
        start = 0
        while len(self.at) < self.count:
            start = self.console.wait_for("B", 600, start).end()
            self.at.append(time.monotonic())

    def running(self) -> None:
        """The guest runs: nothing to do, it beats by itself."""

    def figures(self, t0: float) -> dict:
        """The heartbeats' times; closes the console (QEMU serves one at a time)."""
        self.thread.join(600)
        self.close()
        fig = {"beat": self.at[0] - t0 if self.at else None}
        if self.count > 1:
            fig["full_pass"] = self.at[1] - t0 if len(self.at) > 1 else None
        return fig

    def close(self) -> None:
        if self.console is not None:
            self.console.close()


class Verify:
    """Linux guest: hold a VM's serial console from its spawn; once told the guest runs,
    PING it, then on PONG have memfill VERIFY every page it filled, timing each answer."""

    def __init__(self, path: Path) -> None:
        self.at: dict[str, float] = {}
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.console: SerialConsole | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.thread.start()

    def _run(self, path: Path) -> None:
        try:
            self.console = SerialConsole(path, connect_timeout=120)
            self.started.wait()
            self.at["ping"] = time.monotonic()
            LinuxGuest.ping(self.console)
            self.at["pong"] = time.monotonic()
            LinuxGuest.verify(self.console)
            self.at["verified"] = time.monotonic()
        except Exception as err:  # noqa: BLE001 - raised again by figures()
            self.error = err

    def running(self) -> None:
        self.started.set()

    def figures(self, t0: float) -> dict:
        """The answers' times; closes the console (QEMU serves one at a time)."""
        self.thread.join()
        self.close()
        if self.error is not None:
            raise self.error
        return {"pong": self.at["pong"] - t0, "verified": self.at["verified"] - t0,
                "verify_s": self.at["verified"] - self.at["pong"]}

    def close(self) -> None:
        self.started.set()  # a restore that failed: the PING finds the console closed
        if self.console is not None:
            self.console.close()
        self.thread.join(10)


def vmsnap_restore(snap: Path, vm: Vm, stored: bool, extra: list[str],
                   env: dict[str, str], t0: float, on_running: Callable[[], None]) -> dict:
    """Run `vmsnap restore` (into `vm`'s command line, or the one stored in `snap`), timing
    its "running" event as it arrives, and the CPU it and its QEMU used until it ended."""
    running, end, done, cpu = timed_restore(
        [sys.executable, "-m", "vmsnap", "restore", "--json", *extra, str(snap),
         *([] if stored else ["--", *vm.argv()])], env, t0, on_running)
    return {"running": running, "done": end, **cpu_figures(vm, cpu),
            "pid": done["pid"], "p50": done.get("latency_p50_us"),
            "p99": done.get("latency_p99_us"), "requests": done.get("requests"),
            "hot_pages": done.get("hot_pages"), "preempt": done.get("preempt"),
            "ahead_pages": done.get("ahead_pages"), "from_memory": done.get("from_memory"),
            "populate": done.get("populated_seconds")}


def native_restore(snap: Path, vm: Vm, t0: float) -> dict:
    vm.start()
    vm.set_migration({"mapped-ram": True, "multifd": True},
                     {"multifd-channels": 4, "direct-io": True})
    vm.cmd("migrate-incoming", uri=f"file:{snap}")
    vm.wait_migration()
    vm.cont()
    return {"running": time.monotonic() - t0, "done": time.monotonic() - t0,
            **cpu_figures(vm, 0.0)}


def cpu_figures(vm: Vm, vmsnap_cpu: float) -> dict:
    """CPU seconds (user+system) from the spawn to the restore's end: vmsnap's, its QEMU's
    (every thread: a lazy restore's running vCPU too) and their sum ("cpu")."""
    usage = qemu_usage(vm)
    qemu = usage["cpu_s"] if usage else None
    return {"cpu": None if qemu is None else vmsnap_cpu + qemu, "cpu_vmsnap": vmsnap_cpu,
            "cpu_qemu": qemu}


def run_method(method: str, guest: BootGuest | LinuxGuest, config, snap: Path, saved: Saved,
               workdir: Path, env: dict[str, str], rep: int) -> dict:
    """One restore by `method`, timed to the guest running (every method but
    postcopy-paused runs it: its RAM is checked: bootguest against `saved` once it has,
    stopped at once; Linux guest by the timed VERIFY)."""
    # stored: the saved VM's sockets (its command line names them)
    name = "src" if method == "stored" else f"{method}-{guest.memory_mb}-{rep}"
    vm = Vm(config, workdir, name, incoming="defer")
    paused = method == "postcopy-paused"
    if method in ("postcopy", "postcopy-paused", "stored"):
        Path(f"{snap}.hot").unlink(missing_ok=True)
    elif method in ("postcopy-live", "mmap-live"):
        shutil.copyfile(f"{snap}.hot.live", f"{snap}.hot")
    elif method in ("mmap", "mmap-populate"):
        Path(f"{snap}.hot").unlink(missing_ok=True)
    extra = {"eager": [], "postcopy": ["--lazy=postcopy"], "postcopy-hot": ["--lazy=postcopy"],
             "postcopy-live": ["--lazy=postcopy"], "mmap": ["--lazy=mmap"],
             "postcopy-paused": ["--lazy=postcopy", "--paused"],
             "mmap-live": ["--lazy=mmap"], "mmap-populate": ["--lazy=mmap", "--populate"],
             "stored": ["--lazy"]}.get(method)
    evict_file(snap)
    t0 = time.monotonic()
    probe = (Verify(vm.serial_path) if isinstance(guest, LinuxGuest)
             else Beat(vm.serial_path, 0 if paused else 2))
    try:
        if method == "qemu10":
            fig = native_restore(snap, vm, t0)
        else:
            fig = vmsnap_restore(snap, vm, method == "stored", extra, env, t0, probe.running)
            vm.adopt(fig.pop("pid"))
            if paused:  # its end, not the guest running: it stays paused
                fig["running"] = None
        probe.running()  # eager, qemu10: the guest runs once the restore returned
        fig.update(probe.figures(t0))
        if isinstance(guest, BootGuest):
            guest.check_restored(vm, saved, resumed=not paused)
        fig["ok"] = True
    finally:
        vm.close()
        probe.close()
    return fig


def make_guest(kind: str, size: int, fill: float, ws_mb: int | None) -> BootGuest | LinuxGuest:
    if kind == "linux":
        return LinuxGuest(memory_mb=size, fill_mb=int(size * fill))
    return BootGuest(memory_mb=size, mode="random", limit_mb=int(size * fill), ws_mb=ws_mb)


def save_guest(guest: BootGuest | LinuxGuest, qemu: str, linux: bool, live: bool,
               workdir: Path, env: dict[str, str]) -> tuple[object, Path, Saved]:
    """Boot `guest` and save it once (`--live` with a working set: its hint), to a file of
    its own size: (its QEMU config, the file, what its RAM held)."""
    config = guest.config(qemu, workdir)
    if not linux:
        config.args[-1] += " beat=1"
    snap = workdir / f"vm-{guest.memory_mb}.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        guest.wait_alive(src)
        with guest.saving(src) as saved:
            subprocess.run([sys.executable, "-m", "vmsnap", "save", "--quit", "--force",
                            *(["--live"] if live else []), "--qmp", str(src.tool_qmp_path),
                            str(snap)], check=True, env=env)
        src.proc.wait(60)
    if live:
        shutil.move(f"{snap}.hot", f"{snap}.hot.live")
    return config, snap, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", default="boot", choices=("boot", "linux"))
    ap.add_argument("--sizes", default=None,
                    help="guest RAM sizes in MiB (default 1024,4096,8192; linux 1024)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill", type=float, default=None,
                    help="fraction of RAM the guest fills (default 0.9; linux 0.75)")
    ap.add_argument("--methods", default=None, help="default: every method the QEMU has")
    ap.add_argument("--qemu", default="10", choices=("10", "7.2"))
    ap.add_argument("--dir", default="/var/tmp/vmsnap-lazy")
    ap.add_argument("--ws-mb", type=int, default=None,
                    help="the guest's working set after its first pass, MiB, scattered")
    args = ap.parse_args()
    linux = args.guest == "linux"
    if linux and args.ws_mb:
        ap.error("--ws-mb is a bootguest option")
    sizes = [int(size) for size in (args.sizes or ("1024" if linux else "1024,4096,8192"))
             .split(",")]
    fill = args.fill or (0.75 if linux else 0.9)
    default = [*(METHODS if args.qemu == "10" else METHODS_72),
               *(m for m in METHODS_WS if args.ws_mb and (args.qemu == "10" or "mmap" not in m))]
    if linux:
        default = list(METHODS_LINUX[args.qemu])
    methods = args.methods.split(",") if args.methods else list(default)
    workdir = Path(args.dir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(mode=0o700, parents=True)
    results: dict = {"host": os.uname().nodename, "qemu": args.qemu, "guest": args.guest,
                     "reps": args.reps, "fill": fill, "ws_mb": args.ws_mb,
                     "loadavg_start": os.getloadavg(), "sizes": {}}
    env = vmsnap_env(workdir)
    t_start = time.monotonic()
    guests = {size: make_guest(args.guest, size, fill, args.ws_mb) for size in sizes}
    saved = {size: save_guest(guests[size], args.qemu, linux, bool(args.ws_mb), workdir, env)
             for size in sizes}
    runs: dict[int, dict[str, list[dict]]] = {size: {m: [] for m in methods} for size in sizes}
    before = None
    for rep in range(args.reps):
        # every size and method in a new order each repetition (seeded: a run can be
        # repeated): a restore's QEMU gets the memory its predecessor freed, just now (cheap)
        # or seconds ago and handed back to the outer host (costly: bench/README.md, "Host
        # memory"), and how much depends on the predecessor's size; in blocks of one size,
        # 8 GiB restores would always follow 8 GiB ones
        order = [(size, m) for size in sizes for m in methods]
        random.Random(rep).shuffle(order)
        for size, m in order:
            guest, (config, snap, state) = guests[size], saved[size]
            try:
                fig = run_method(m, guest, config, snap, state, workdir, env, rep)
            except Exception as err:  # noqa: BLE001 - recorded, left out of the medians
                fig = {"ok": False, "error": str(err)}
            fig["loadavg"] = os.getloadavg()[0]
            fig["after"] = before
            before = f"{m} {size}"
            runs[size][m].append(fig)
            print(f"{size} MiB rep {rep} {m}: {fig}", flush=True)
    for size in sizes:
        results["sizes"][size] = {m: {"runs": r, "median": medians(r)}
                                  for m, r in runs[size].items()}
        snap = saved[size][1]
        for leftover in (snap, Path(f"{snap}.hot"), Path(f"{snap}.hot.live")):
            leftover.unlink(missing_ok=True)
    results["size_effect"] = {m: size_effect(runs, m) for m in methods}
    results["elapsed_s"] = time.monotonic() - t_start
    results["loadavg_end"] = os.getloadavg()
    ws = f"-ws{args.ws_mb}" if args.ws_mb else "-linux" if linux else ""
    out = (REPO / "bench" / "results"
           / f"lazy-qemu{args.qemu}{ws}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(effect_lines(results))
    print(f"results: {out}")


def medians(runs: list[dict]) -> dict:
    good = [r for r in runs if r.get("ok")]
    out = {"ok": f"{len(good)}/{len(runs)}"}
    for key in ("running", "beat", "full_pass", "populate", "pong", "verified", "verify_s",
                "done", "cpu", "p50", "p99", "requests", "loadavg"):
        values = [r[key] for r in good if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def size_effect(runs: dict[int, dict[str, list[dict]]], method: str,
                key: str = "running", resamples: int = 2000) -> dict | None:
    """How `key` (seconds) of `method` depends on RAM size, over its good runs at every size:
    the largest over the smallest per-size median, and the least-squares slope in ms per
    GiB with a 95 % bootstrap interval (runs resampled within each size, seeded), which a
    few slow runs at one size move less than they move two medians."""
    by = {size: [r[key] * 1000 for r in by_m[method] if r.get("ok") and r.get(key) is not None]
          for size, by_m in runs.items()}
    if len(by) < 2 or any(len(v) < 2 for v in by.values()):
        return None

    def slope(sample: dict[int, list[float]]) -> float:
        xs = [size / 1024 for size, v in sample.items() for _ in v]
        return statistics.linear_regression(xs, [y for v in sample.values() for y in v]).slope

    rng = random.Random(0)
    boot = sorted(slope({size: rng.choices(v, k=len(v)) for size, v in by.items()})
                  for _ in range(resamples))
    med = {size: statistics.median(v) for size, v in by.items()}
    return {"key": key, "medians_ms": med, "largest_over_smallest": max(med.values())
            / min(med.values()), "slope_ms_per_gib": slope(by),
            "slope_95": [boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]],
            "runs": sum(len(v) for v in by.values())}


def effect_lines(results: dict) -> str:
    """One line per method: its time to running against RAM size (size_effect)."""
    lines = []
    for m, e in results.get("size_effect", {}).items():
        if e is not None:
            meds = " / ".join(f"{v / 1000:.3f}" for v in e["medians_ms"].values())
            lo, hi = e["slope_95"]
            lines.append(f"{m}: {e['key']} medians {meds} s (largest/smallest "
                         f"{e['largest_over_smallest']:.2f}), slope {e['slope_ms_per_gib']:+.1f}"
                         f" ms/GiB [95 % {lo:+.1f} .. {hi:+.1f}] over {e['runs']} runs")
    return "\n".join(lines)


def table(results: dict) -> str:
    ws = results.get("ws_mb")
    linux = results.get("guest") == "linux"
    guest = ("Linux guest" if linux else "bootguest") + (f", working set {ws} MiB" if ws else "")
    middle = ([("pong", "PONG s", ".2f"), ("verified", "VERIFY done s", ".2f"),
               ("verify_s", "VERIFY s", ".2f"), ("verify_x", "VERIFY / eager's", ".2f")]
              if linux else [("beat", "first heartbeat s", ".2f"),
                             ("full_pass", "full pass s", ".2f"),
                             ("populate", "populate s", ".2f")])
    cols = [("ok", "ok", ""), ("running", "running s", ".2f"), *middle, ("done", "done s", ".2f"),
            ("cpu", "CPU s", ".2f"), ("p50", "p50 us", ".0f"), ("p99", "p99 us", ".0f"),
            ("requests", "requests", ".0f"), ("loadavg", "load", ".1f")]
    rows = [f"QEMU {results['qemu']}, {guest}",
            "| RAM | method | " + " | ".join(h for _, h, _ in cols) + " |",
            "|---|---|" + "---|" * len(cols)]
    for size, by in results["sizes"].items():
        eager = by.get("eager", {}).get("median", {}).get("verify_s")
        for m, d in by.items():
            md = dict(d["median"])
            if md.get("verify_s") is not None and eager:
                md["verify_x"] = md["verify_s"] / eager
            cells = ("" if md.get(k) is None else format(md[k], fmt) for k, _, fmt in cols)
            rows.append(f"| {int(size)} MiB | {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
