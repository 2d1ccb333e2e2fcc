"""The main job on a real VM: boot a guest, vmsnap save, vmsnap restore (relaunching QEMU
from the command line stored in the file), check every page, and compare with exec:cat.

    python -m testbed.demo [--guest linux|boot] [--memory-mb N] [--fill-mb N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import vmsnap
from testbed.guests import BootGuest, LinuxGuest
from testbed.qemu import Vm, exec_uri

console = Console()


def _timed(label: str, fn, timings: dict[str, float]):
    t0 = time.monotonic()
    result = fn()
    timings[label] = time.monotonic() - t0
    console.print(f"  {label}: [bold]{timings[label]:.2f} s[/bold]")
    return result


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        console.print("  (cannot drop the page cache: restores below may be warm)")


def run(guest, workdir: Path) -> dict:
    config = guest.config("7.2", workdir)
    snap = workdir / "vm.snap"
    stream = workdir / "vm.stream"
    timings: dict[str, float] = {}
    console.rule(f"[bold]{guest.kind}[/bold]: {config.memory_mb} MiB RAM, QEMU 7.2, "
                 f"{config.accel}")

    console.print("exec:cat (QEMU's own migration to a file), for comparison")
    with Vm(config, workdir, "cat-src") as vm:
        _timed("boot", lambda: guest.boot(vm), timings)
        with guest.saving(vm) as held:
            vm.stop()
            _timed("exec:cat save + sync", lambda: (
                vm.migrate(exec_uri("cat", stdout=stream),
                           parameters={"max-bandwidth": 1 << 40}),
                subprocess.run(["sync"], check=True)), timings)
    drop_caches()
    with Vm(config, workdir, "cat-dst", incoming=exec_uri("cat", stream)) as vm:
        _timed("exec:cat restore (cold cache)", vm.wait_incoming, timings)
        console.print(f"  RAM check: {_describe(guest.check_restored(vm, held))}")
    stream_size = stream.stat().st_size
    stream.unlink()

    console.print("vmsnap")
    src = Vm(config, workdir, "vm")
    with src:
        guest.boot(src)
        with guest.saving(src) as held:
            saved = _timed("vmsnap save (paused, fsynced)", lambda: vmsnap.save(
                str(src.tool_qmp_path), snap, after="quit"), timings)
    info = json.loads(subprocess.run(["vmsnap", "info", "--json", str(snap)], check=True,
                                     capture_output=True, text=True).stdout)
    _timed("vmsnap verify", lambda: subprocess.run(["vmsnap", "verify", str(snap)],
                                                   check=True, capture_output=True), timings)
    drop_caches()
    restored = _timed("vmsnap restore (relaunch from file, cold cache)",
                      lambda: vmsnap.restore(snap, paused=True), timings)
    with Vm(config, workdir, "vm").adopt(restored.pid) as dst:
        console.print(f"  RAM check: {_describe(guest.check_restored(dst, held))}")
    figures = {"guest": guest.kind, "memory_mb": config.memory_mb, "timings_s": timings,
               "exec_cat_stream_bytes": stream_size, "vmsnap_stream_bytes": saved.stream_bytes,
               "snapshot_apparent": info["apparent_size"],
               "snapshot_allocated": info["allocated_size"]}
    _table(figures)
    return figures


def _describe(result) -> str:
    return result if isinstance(result, str) else result.describe()


def _table(f: dict) -> None:
    t = f["timings_s"]
    table = Table(title=f"{f['guest']}, {f['memory_mb']} MiB")
    table.add_column("")
    table.add_column("exec:cat", justify="right")
    table.add_column("vmsnap", justify="right")
    table.add_row("save (s)", f"{t['exec:cat save + sync']:.2f}",
                  f"{t['vmsnap save (paused, fsynced)']:.2f}")
    table.add_row("restore, cold (s)", f"{t['exec:cat restore (cold cache)']:.2f}",
                  f"{t['vmsnap restore (relaunch from file, cold cache)']:.2f}")
    table.add_row("file apparent (MB)", f"{f['exec_cat_stream_bytes'] / 1e6:.1f}",
                  f"{f['snapshot_apparent'] / 1e6:.1f}")
    table.add_row("file allocated (MB)", f"{f['exec_cat_stream_bytes'] / 1e6:.1f}",
                  f"{f['snapshot_allocated'] / 1e6:.1f}")
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest", choices=("linux", "boot"), default="linux")
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--fill-mb", type=int, default=768, help="linux guest: MiB of RAM to fill")
    p.add_argument("--dir", type=Path, help="work directory, kept afterwards (default: a "
                   "private temp dir, removed afterwards)")
    args = p.parse_args()
    guest = (LinuxGuest(memory_mb=args.memory_mb, fill_mb=args.fill_mb)
             if args.guest == "linux" else BootGuest(mode="random", memory_mb=args.memory_mb))
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="vmsnap-demo-"))
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        run(guest, workdir)
    finally:
        if args.dir is None:  # the snapshot and stream are as large as guest RAM
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
