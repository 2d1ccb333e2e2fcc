"""Save modes compared: paused, --live and --background (issue 9).

    .venv/bin/python -m bench.save_modes [--reps 3] [--quick] [--dir DIR]

A. Guest pause and guest progress: bootguest `mode=random limit_mb=256` (it re-stamps a
   256 MiB hot set as fast as it can), QEMU 7.2 + KVM, 1 and 4 GiB of RAM, one stream.
   pause: paused = the whole save (vmsnap stops the guest first); --live and --background =
   QEMU's downtime (vmsnap adds no stop of its own). progress: the guest's sweeps per
   second (its first page's counter, read over the test bed's own QMP monitor) between
   vmsnap's `start` and `done` events (the save itself: not the child's start-up or exit,
   when the guest runs freely), over the same rate in the 2 s just before the save (once
   the guest has made two heartbeats since the previous save: write tracking leaves every
   page to fault once more, which under this host's nested KVM takes seconds). The guest
   writes each page once per sweep, so every write is a first write: the worst case for
   dirty logging (--live) and write protection (--background).
B. Save time and file size: linuxguest, QEMU 10 + TCG, 1 GiB with 512 MiB filled by
   memfill, idle and dirtying 150 MB/s; paused and --live on one stream and on 2 channels,
   --background (always one stream). "x paused": the repetition's save time over the
   paused save's of the same guest, same number of streams.

One guest per (scenario, repetition); the modes run on it in an order that rotates every
repetition (interleaved); medians [min-max] of the repetitions. The 1-minute load average
is recorded with every save (the host is shared). Prints tables, writes
bench/results/<timestamp>-save-modes.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import summarize
from testbed.guests import BootGuest, LinuxGuest
from testbed.qemu import Vm

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {  # name: vmsnap save options
    "paused": ["--resume", "--channels", "0"],
    "live": ["--live", "--resume", "--channels", "0"],
    "background": ["--background"],
    "paused-2ch": ["--resume", "--channels", "2"],
    "live-2ch": ["--live", "--resume", "--channels", "2"],
}
PAUSE_MODES = ("paused", "live", "background")
IDLE_S = 2.0
console = Console(width=None if sys.stdout.isatty() else 160)


def save(vm: Vm, snap: Path, mode: str, probe: Callable[[], int] | None = None
         ) -> dict[str, Any]:
    """One vmsnap save as a child process: its JSON done event, the file's size, and
    `probe()` with the time when vmsnap reports the start and the end of the save."""
    argv = [sys.executable, "-m", "vmsnap.cli", "save", "--json", "--force", *MODES[mode],
            "--qmp", str(vm.tool_qmp_path), str(snap)]
    marks: dict[str, tuple[float, int | None]] = {}
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "TMPDIR": str(vm.workdir)}) as proc:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] in ("start", "done"):
                marks[event["event"]] = (time.monotonic(), probe() if probe else None)
                done = event
        stderr = proc.stderr.read()
    if proc.returncode != 0 or "done" not in marks:
        raise RuntimeError(f"vmsnap save {mode} failed: {stderr.strip()[-300:]}")
    (ts, ps), (te, pe) = marks["start"], marks["done"]
    return {"mode": mode, "seconds": done["seconds"], "wall_s": time.monotonic() - t0,
            "pause_ms": done["seconds"] * 1000 if mode.startswith("paused")
            else done["downtime_ms"],
            "downtime_ms": done["downtime_ms"], "rounds": done.get("rounds"),
            "file_bytes": snap.stat().st_size, "dirty_mb_s": done.get("dirty_mb_s"),
            "downtime_limit_ms": done.get("downtime_limit_ms"), "ram_path": done["ram_path"],
            "window_s": te - ts, "probed": pe - ps if probe else None,
            "load1": os.getloadavg()[0]}


def pause_and_progress(workdir: Path, ram_mb: int, rep: int) -> list[dict[str, Any]]:
    guest = BootGuest(memory_mb=ram_mb, mode="random", limit_mb=256)
    rows = []
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:
        guest.boot(vm)
        for mode in rotate(PAUSE_MODES, rep):
            for _ in range(2):  # a full pass since the last save: under nested KVM each page's
                guest.wait_alive(vm)  # first write after dirty logging faults, slowly
            c0, t0 = guest.counter(vm), time.monotonic()
            time.sleep(IDLE_S)
            idle = (guest.counter(vm) - c0) / (time.monotonic() - t0)
            row = save(vm, workdir / "vm.snap", mode, lambda: guest.counter(vm))
            during = row["probed"] / row["window_s"]
            rows.append({**row, "ram_mb": ram_mb, "rep": rep, "idle_sweeps_s": idle,
                         "save_sweeps_s": during, "progress": during / idle if idle else None})
            (workdir / "vm.snap").unlink()
    return rows


def time_and_size(workdir: Path, load: str, rep: int, ram_mb: int,
                  fill_mb: int) -> list[dict[str, Any]]:
    guest = LinuxGuest(memory_mb=ram_mb, fill_mb=fill_mb, mode="dirty" if load else "idle",
                       rate_mb_s=150 if load else 0)
    rows = []
    with Vm(guest.config("10", workdir), workdir, "src") as vm:
        guest.boot(vm)
        for mode in rotate(tuple(MODES), rep):
            guest.wait_alive(vm)
            rows.append({**save(vm, workdir / "vm.snap", mode), "load": load or "idle",
                         "rep": rep})
            (workdir / "vm.snap").unlink()
    for r in rows:  # against the paused save of the same guest, same number of streams
        base = next(p for p in rows if p["mode"] == ("paused-2ch" if "2ch" in r["mode"]
                                                     else "paused"))
        r["x_paused"] = r["seconds"] / base["seconds"]
    return rows


def rotate(items: tuple[str, ...], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:] + items[:k])


def fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None:
        return "-"
    return (f"{stat['median'] * scale:.{digits}f} [{stat['min'] * scale:.{digits}f}-"
            f"{stat['max'] * scale:.{digits}f}]")


def medians(rows: list[dict[str, Any]], keys: tuple[str, ...], group: tuple[str, ...]
            ) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = " ".join(str(r[g]) for g in group)
        out.setdefault(name, {g: r[g] for g in group})
    for head in out.values():
        mine = [r for r in rows if all(r[g] == head[g] for g in group)]
        for k in keys:
            head[k] = summarize([r[k] for r in mine])
    return out


def print_tables(pauses: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]],
                 linux: tuple[int, int]) -> None:
    t = Table("RAM", "mode", "guest pause ms", "save s", "guest progress (x idle)", "load 1m",
              title="A. bootguest (QEMU 7.2 KVM, 256 MiB hot set), one stream: "
                    "median [min-max]")
    for r in pauses.values():
        t.add_row(f"{r['ram_mb']} MiB", r["mode"], fmt(r["pause_ms"], digits=0),
                  fmt(r["seconds"]), fmt(r["progress"]), fmt(r["load1"], digits=1))
    console.print(t)
    t = Table("guest", "mode", "save s", "x paused", "file MB", "guest pause ms", "rounds",
              "load 1m", title=f"B. linuxguest (QEMU 10 TCG, {linux[0]} MiB, {linux[1]} MiB "
                               "filled): median [min-max]")
    for r in sizes.values():
        t.add_row("idle" if r["load"] == "idle" else "dirtying 150 MB/s", r["mode"],
                  fmt(r["seconds"]), fmt(r["x_paused"]), fmt(r["file_bytes"], 1e-6, 0),
                  fmt(r["pause_ms"], digits=0), fmt(r["rounds"], digits=0),
                  fmt(r["load1"], digits=1))
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small guests, 1 repetition")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/vmsnap-bench-modes"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    reps = 1 if args.quick else args.reps
    sizes = (512, 1024) if args.quick else (1024, 4096)
    linux = (512, 256) if args.quick else (1024, 512)
    args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    args.dir.chmod(0o700)
    started, load_start = time.monotonic(), os.getloadavg()
    pause_rows: list[dict[str, Any]] = []
    size_rows: list[dict[str, Any]] = []
    try:
        for rep in range(reps):
            for ram_mb in sizes:
                pause_rows += pause_and_progress(args.dir, ram_mb, rep)
            for load in ("", "dirty"):
                size_rows += time_and_size(args.dir, load, rep, *linux)
            console.print(f"repetition {rep + 1}/{reps} done at "
                          f"{time.monotonic() - started:.0f} s, load {os.getloadavg()}")
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    pauses = medians(pause_rows, ("pause_ms", "seconds", "progress", "idle_sweeps_s",
                                  "save_sweeps_s", "load1"), ("ram_mb", "mode"))
    sizes_t = medians(size_rows, ("seconds", "x_paused", "file_bytes", "pause_ms", "rounds",
                                  "load1"), ("load", "mode"))
    print_tables(pauses, sizes_t, linux)
    elapsed = time.monotonic() - started
    console.print(f"elapsed {elapsed:.0f} s, load average at start {load_start}, "
                  f"at end {os.getloadavg()}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out / f"{stamp}-save-modes{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({
        "reps": reps, "elapsed_s": elapsed, "host": platform.node(),
        "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "pause_progress": {"runs": pause_rows, "medians": list(pauses.values())},
        "time_size": {"runs": size_rows, "medians": list(sizes_t.values())},
    }, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
