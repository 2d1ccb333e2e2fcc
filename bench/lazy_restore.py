"""Lazy restore (postcopy, mmap) next to eager vmsnap restore and QEMU 10's native
mapped-ram load, in one run, interleaved, cold cache.

    sudo .venv/bin/python bench/lazy_restore.py [--sizes 1024,4096,8192] [--reps 3]
                                                [--fill 0.9] [--dir /var/tmp/vmsnap-lazy]
                                                [--qemu 10|7.2] [--ws-mb N]

Per size: a bootguest (QEMU 10 or 7.2; 7.2 runs eager and postcopy only, having neither
memory-backend-file offset= nor mapped-ram; KVM, mode=random, `limit_mb` = fill x RAM, `beat=1`: a
heartbeat after every full pass over its pages) is booted and saved once with
`vmsnap save --quit`. Each repetition then runs every method in turn, each into a freshly
launched QEMU (`vmsnap restore FILE ... -- ARGV`; the native one is started by the bench),
the snapshot file evicted from the page cache first (the programs stay warm: a full
drop_caches makes Python's and QEMU's own start-up dominate), and checks the guest's RAM
afterwards (one-moving-edge rule, read 64 MiB at a time: the bench stays small whatever the
guest's size). vmsnap runs as `python -m vmsnap` with its modules compiled beforehand, as
an installed vmsnap runs (bench.common.vmsnap_env):

  eager         vmsnap restore (multifd, default channels)
  postcopy      vmsnap restore --lazy=postcopy, FILE.hot removed first
  postcopy-hot  the same with the FILE.hot the previous postcopy run recorded
  postcopy-live (--ws-mb) the same with the FILE.hot the live save recorded: the pages it
                saw re-dirtied in its last rounds (with --ws-mb the save is `--live`)
  mmap          vmsnap restore --lazy=mmap (background checksum pass included in "done"),
                FILE.hot removed first
  mmap-live     (--ws-mb) the same with the live save's FILE.hot: its pages are read ahead
                into the page cache while QEMU starts
  qemu10        QEMU 10 `migrate-incoming file:FILE` with mapped-ram, multifd 4, direct-io

Figures, all from the command's start (spawn of vmsnap, or of QEMU for qemu10):
  running   the guest's vCPUs run (vmsnap's "running" event as it arrives; qemu10:
            query-status)
  beat      first heartbeat: the guest completed a full pass over all its pages
  done      the command ended: postcopy = every page resident; eager/qemu10 = loaded and
            running; mmap = background check of every mapped page finished
  ws pass   --ws-mb N (a guest whose working set is N MiB of pages scattered over its RAM,
            bootguest ws_mb=N; beat=1 makes a heartbeat after every pass over them): the
            second heartbeat, i.e. the first pass over the whole working set made wholly
            after the restore (the first heartbeat ends a pass the save interrupted)
  p50/p99   postcopy page-request latency (receipt of the request -> page sent), us
  requests  postcopy page requests (pages the guest touched before they were pushed)
Medians of the repetitions; JSON with every repetition in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import evict_file, timed_restore, vmsnap_env  # noqa: E402
from testbed.guests import BootGuest, Saved  # noqa: E402
from testbed.qemu import Vm  # noqa: E402
from testbed.serial import SerialConsole  # noqa: E402

METHODS = ("eager", "postcopy", "postcopy-hot", "mmap", "qemu10")
METHODS_72 = ("eager", "postcopy", "postcopy-hot")
#: --ws-mb: also the hint a live save records (the pages re-dirtied in its last rounds)
METHODS_WS = ("postcopy-live", "mmap-live")


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

    def close(self) -> None:
        self.thread.join(600)
        if self.console is not None:
            self.console.close()


def vmsnap_restore(snap: Path, argv: list[str], extra: list[str], env: dict[str, str],
                   t0: float) -> dict:
    """Run `vmsnap restore`, timing its "running" event as it arrives."""
    running, end, done = timed_restore(
        [sys.executable, "-m", "vmsnap", "restore", "--json", *extra, str(snap), "--",
         *argv], env, t0)
    return {"running": running, "done": end,
            "pid": done["pid"], "p50": done.get("latency_p50_us"),
            "p99": done.get("latency_p99_us"), "requests": done.get("requests"),
            "hot_pages": done.get("hot_pages")}


def native_restore(snap: Path, vm: Vm, t0: float) -> dict:
    vm.start()
    vm.set_migration({"mapped-ram": True, "multifd": True},
                     {"multifd-channels": 4, "direct-io": True})
    vm.cmd("migrate-incoming", uri=f"file:{snap}")
    vm.wait_migration()
    vm.cont()
    return {"running": time.monotonic() - t0, "done": time.monotonic() - t0}


def run_method(method: str, guest: BootGuest, config, snap: Path, saved: Saved,
               workdir: Path, env: dict[str, str], rep: int) -> dict:
    """One restore by `method`, timed to the guest running (every method runs it: its RAM
    is checked against `saved` once it has, stopped at once)."""
    name = f"{method}{rep}"
    vm = Vm(config, workdir, name, incoming="defer")
    if method == "postcopy":
        Path(f"{snap}.hot").unlink(missing_ok=True)
    elif method in ("postcopy-live", "mmap-live"):
        shutil.copyfile(f"{snap}.hot.live", f"{snap}.hot")
    elif method == "mmap":
        Path(f"{snap}.hot").unlink(missing_ok=True)
    extra = {"eager": [], "postcopy": ["--lazy=postcopy"], "postcopy-hot": ["--lazy=postcopy"],
             "postcopy-live": ["--lazy=postcopy"], "mmap": ["--lazy=mmap"],
             "mmap-live": ["--lazy=mmap"]}.get(method)
    evict_file(snap)
    t0 = time.monotonic()
    beat = Beat(vm.serial_path, 2 if guest.ws_mb else 1)
    try:
        if method == "qemu10":
            fig = native_restore(snap, vm, t0)
        else:
            fig = vmsnap_restore(snap, vm.argv(), extra, env, t0)
            vm.adopt(fig.pop("pid"))
        beat.close()
        fig["beat"] = beat.at[0] - t0 if beat.at else None
        if guest.ws_mb:
            fig["ws_pass"] = beat.at[1] - t0 if len(beat.at) > 1 else None
        guest.check_restored(vm, saved, resumed=True)
        fig["ok"] = True
    finally:
        vm.close()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,4096,8192", help="guest RAM sizes in MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill", type=float, default=0.9, help="fraction of RAM the guest fills")
    ap.add_argument("--methods", default=None, help="default: every method the QEMU has")
    ap.add_argument("--qemu", default="10", choices=("10", "7.2"))
    ap.add_argument("--dir", default="/var/tmp/vmsnap-lazy")
    ap.add_argument("--ws-mb", type=int, default=None,
                    help="the guest's working set after its first pass, MiB, scattered")
    args = ap.parse_args()
    default = [*(METHODS if args.qemu == "10" else METHODS_72),
               *(m for m in METHODS_WS if args.ws_mb and (args.qemu == "10" or "mmap" not in m))]
    methods = args.methods.split(",") if args.methods else list(default)
    workdir = Path(args.dir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(mode=0o700, parents=True)
    results: dict = {"host": os.uname().nodename, "qemu": args.qemu, "reps": args.reps,
                     "fill": args.fill, "ws_mb": args.ws_mb, "loadavg_start": os.getloadavg(),
                     "sizes": {}}
    env = vmsnap_env(workdir)
    t_start = time.monotonic()
    for size in map(int, args.sizes.split(",")):
        guest = BootGuest(memory_mb=size, mode="random", limit_mb=int(size * args.fill),
                          ws_mb=args.ws_mb)
        config = guest.config(args.qemu, workdir)
        config.args[-1] += " beat=1"
        snap = workdir / "vm.snap"
        with Vm(config, workdir, "src") as src:
            guest.boot(src)
            guest.wait_alive(src)
            live = ["--live"] if args.ws_mb else []  # its hint: the working set
            with guest.saving(src) as saved:
                subprocess.run([sys.executable, "-m", "vmsnap", "save", "--quit", "--force",
                                *live, "--qmp", str(src.tool_qmp_path), str(snap)],
                               check=True, env=env)
            src.proc.wait(60)
        if live:
            shutil.move(f"{snap}.hot", f"{snap}.hot.live")
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.reps):
            for m in methods:
                try:
                    fig = run_method(m, guest, config, snap, saved, workdir, env, rep)
                except Exception as err:  # noqa: BLE001 - recorded, left out of the medians
                    fig = {"ok": False, "error": str(err)}
                fig["loadavg"] = os.getloadavg()[0]
                runs[m].append(fig)
                print(f"{size} MiB rep {rep} {m}: {fig}", flush=True)
        results["sizes"][size] = {m: {"runs": r, "median": medians(r)} for m, r in runs.items()}
        snap.unlink()
        Path(f"{snap}.hot").unlink(missing_ok=True)
        Path(f"{snap}.hot.live").unlink(missing_ok=True)
    results["elapsed_s"] = time.monotonic() - t_start
    results["loadavg_end"] = os.getloadavg()
    ws = f"-ws{args.ws_mb}" if args.ws_mb else ""
    out = (REPO / "bench" / "results"
           / f"lazy-qemu{args.qemu}{ws}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"results: {out}")


def medians(runs: list[dict]) -> dict:
    good = [r for r in runs if r.get("ok")]
    out = {"ok": f"{len(good)}/{len(runs)}"}
    for key in ("running", "beat", "ws_pass", "done", "p50", "p99", "requests", "loadavg"):
        values = [r[key] for r in good if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def table(results: dict) -> str:
    ws = results.get("ws_mb")
    rows = [f"QEMU {results['qemu']}" + (f", working set {ws} MiB" if ws else ""),
            "| RAM | method | ok | running s | first heartbeat s | ws pass s | done s | p50 us "
            "| p99 us | requests | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for size, by in results["sizes"].items():
        for m, d in by.items():
            md = d["median"]
            rows.append(f"| {int(size)} MiB | {m} | {md['ok']} | {f(md['running'], '.2f')}"
                        f" | {f(md['beat'], '.2f')} | {f(md.get('ws_pass'), '.2f')}"
                        f" | {f(md['done'], '.2f')}"
                        f" | {f(md['p50'], '.0f')} | {f(md['p99'], '.0f')}"
                        f" | {f(md.get('requests'), '.0f')}"
                        f" | {f(md['loadavg'], '.1f')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
