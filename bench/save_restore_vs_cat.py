"""vmsnap save / cold-cache restore next to QEMU's own `exec:cat`, measured in one run.

    sudo .venv/bin/python bench/save_restore_vs_cat.py [--memory-mb 4096] [--reps 3]
                                                       [--qemu 7.2] [--dir /var/tmp]

A BootGuest in random mode (every page non-zero) is booted once. Each repetition, in
alternating order, times:
  save    vmsnap: `vmsnap save --resume` (stop, stream, fsync, rename, cont)
          cat:    stop; migrate "exec:cat > FILE"; sync; cont
  restore (page cache dropped first: `sync; echo 3 > /proc/sys/vm/drop_caches`) into a QEMU
          waiting with `-incoming defer`, from the migrate-incoming / vmsnap start until the
          state is loaded:
          vmsnap: `vmsnap restore FILE --qmp SOCK --paused`
          cat:    migrate-incoming "exec:cat FILE"
Wall times of the whole command are reported (vmsnap's include Python start-up) next to
vmsnap's own figure. Prints a table of medians and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.guests import BootGuest  # noqa: E402
from testbed.qemu import Vm, exec_uri  # noqa: E402

UNLIMITED = {"max-bandwidth": 1 << 40}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def vmsnap(*args) -> dict:
    """Run the vmsnap CLI with --json; returns its done event (+ wall seconds)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vmsnap.cli", *map(str, args), "--json"],
                       capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - t0
    if r.returncode:
        raise RuntimeError(f"vmsnap {args[0]} failed: {r.stderr.strip()}")
    done = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall": wall, "own": done["seconds"], "bytes": done["stream_bytes"]}


def save_cat(vm: Vm, stream: Path) -> dict:
    stream.unlink(missing_ok=True)
    t0 = time.monotonic()
    vm.stop()
    vm.migrate(exec_uri("cat", stdout=stream), parameters=UNLIMITED)
    os.sync()
    vm.cont()
    return {"wall": time.monotonic() - t0, "bytes": stream.stat().st_size}


def save_vmsnap(vm: Vm, snap: Path) -> dict:
    return vmsnap("save", "--resume", "--force", "--qmp", vm.tool_qmp_path, snap)


def restore(config, workdir: Path, how: str, path: Path) -> dict:
    drop_caches()
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        if how == "vmsnap":
            return vmsnap("restore", path, "--qmp", dst.tool_qmp_path, "--paused")
        t0 = time.monotonic()
        dst.cmd("migrate-incoming", uri=exec_uri("cat", path))
        dst.wait_incoming()
        return {"wall": time.monotonic() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mb", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--qemu", default="7.2")
    ap.add_argument("--dir", default="/var/tmp", help="where the files go (a real disk)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vmsnap-bench-", dir=args.dir))
    guest = BootGuest(memory_mb=args.memory_mb, mode="random")
    config = guest.config(args.qemu, workdir)
    stream, snap = workdir / "stream.cat", workdir / "vm.snap"
    runs: dict[str, list[dict]] = {k: [] for k in
                                   ("save_cat", "save_vmsnap", "restore_cat", "restore_vmsnap")}
    try:
        with Vm(config, workdir, "src") as src:
            guest.boot(src)
            for rep in range(args.reps):
                order = ("cat", "vmsnap") if rep % 2 == 0 else ("vmsnap", "cat")
                for how in order:
                    r = save_cat(src, stream) if how == "cat" else save_vmsnap(src, snap)
                    runs[f"save_{how}"].append(r)
                    print(f"rep {rep + 1} save {how}: {r['wall']:.2f}s", flush=True)
                for how in order:
                    r = restore(config, workdir, how, stream if how == "cat" else snap)
                    runs[f"restore_{how}"].append(r)
                    print(f"rep {rep + 1} restore {how}: {r['wall']:.2f}s", flush=True)
        snap_size = snap.stat().st_size
        snap_alloc = snap.stat().st_blocks * 512
        stream_size = stream.stat().st_size
    finally:
        for f in (stream, snap):
            f.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    med = {k: statistics.median(r["wall"] for r in v) for k, v in runs.items()}
    own = {k: statistics.median(r["own"] for r in v) for k, v in runs.items() if "own" in v[0]}
    gib = args.memory_mb / 1024
    print(f"\n{gib:g} GiB BootGuest (random), QEMU {args.qemu}, {config.accel}, "
          f"median of {args.reps}, cold cache for restores")
    print(f"{'':10}{'exec:cat':>12}{'vmsnap wall':>14}{'vmsnap own':>13}")
    for op in ("save", "restore"):
        print(f"{op:10}{med[f'{op}_cat']:>11.2f}s{med[f'{op}_vmsnap']:>13.2f}s"
              f"{own[f'{op}_vmsnap']:>12.2f}s")
    print(f"file sizes: cat stream {stream_size:,} B; vmsnap {snap_size:,} B apparent, "
          f"{snap_alloc:,} B allocated")
    out = REPO / "bench" / "results" / time.strftime("save_restore_vs_cat-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "memory_mb": args.memory_mb, "qemu": args.qemu, "accel": config.accel,
        "reps": args.reps, "median_wall_s": med, "median_vmsnap_own_s": own,
        "stream_bytes": stream_size, "snapshot_apparent": snap_size,
        "snapshot_allocated": snap_alloc, "runs": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
