#!/usr/bin/env python3
"""Save and restore one guest to a local file, an RBD image and S3 (Ceph RGW) in the same run.

    .venv/bin/python bench/ceph_targets.py [--memory-mb 4096] [--reps 1] [--dir /var/tmp/...]

Starts the one-node Ceph (scripts/ceph.sh; stopped at the end if this started it). Per rep and
target (interleaved): boot a bootguest `mode=random` (every page non-zero, QEMU 7.2, KVM),
pause it, `vmsnap save --json` (durable: fsync / RBD snapshot / S3 manifest), then restore
with `vmsnap restore --json --qmp` into a fresh `-incoming defer` QEMU (page cache dropped
first), check every page. Prints a table and writes bench/results/<ts>-ceph.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import drop_caches, run_child, summarize  # noqa: E402
from testbed.guests import BootGuest  # noqa: E402
from testbed.qemu import Vm  # noqa: E402

VMSNAP = str(Path(sys.executable).with_name("vmsnap"))
CEPH = ["bash", str(ROOT / "scripts" / "ceph.sh")]


def ceph_env() -> dict[str, str]:
    out = subprocess.run([*CEPH, "env"], check=True, capture_output=True, text=True).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


def one(target: str, url: str, memory_mb: int, wd: Path) -> dict:
    guest = BootGuest(memory_mb=memory_mb, mode="random")
    config = guest.config("7.2", wd)
    env = {"TMPDIR": str(wd)}
    with Vm(config, wd, "src") as src:
        guest.boot(src)
        src.stop()
        save = run_child([VMSNAP, "save", "--json", "--force", "--qmp", str(src.tool_qmp_path),
                          url], env=env)
        if save.returncode:
            raise RuntimeError(f"{target} save: {save.stderr.strip()[-400:]}")
    with Vm(config, wd, "dst", incoming="defer") as dst:
        drop_caches()
        restore = run_child([VMSNAP, "restore", "--json", url, "--qmp",
                             str(dst.tool_qmp_path)], env=env)
        if restore.returncode:
            raise RuntimeError(f"{target} restore: {restore.stderr.strip()[-400:]}")
        check = guest.check_restored(dst)
    return {"save_s": save.seconds, "restore_s": restore.seconds,
            "save_cpu_s": save.cpu_seconds, "restore_cpu_s": restore.cpu_seconds,
            "check": check.describe()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-mb", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vmsnap-bench-ceph"))
    args = ap.parse_args()
    args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    was_running = subprocess.run([*CEPH, "status"], capture_output=True).returncode == 0
    subprocess.run([*CEPH, "start"], check=True)
    os.environ.update(ceph_env())
    tag = uuid.uuid4().hex[:8]
    targets = {"file": str(args.dir / "vm.snap"), "rbd": f"rbd:rbd/bench-{tag}",
               "s3": f"s3://vmsnap/bench-{tag}/vm.snap"}
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    try:
        for rep in range(args.reps):
            for target, url in targets.items():
                wd = args.dir / f"{target}-{rep}"
                wd.mkdir(mode=0o700, exist_ok=True)
                r = one(target, url, args.memory_mb, wd)
                print(f"rep {rep} {target}: save {r['save_s']:.2f}s restore "
                      f"{r['restore_s']:.2f}s ({r['check']})", flush=True)
                runs[target].append(r)
    finally:
        if not was_running:
            subprocess.run([*CEPH, "stop"])
    summary = {t: {k: summarize([r[k] for r in rs])
                   for k in ("save_s", "restore_s", "save_cpu_s", "restore_cpu_s")}
               for t, rs in runs.items()}
    gib = args.memory_mb / 1024
    print(f"\n{gib:g} GiB bootguest mode=random, QEMU 7.2 + KVM, paused; seconds, median "
          f"of {args.reps} [min-max]")
    print("| target | save | restore | GiB/s save / restore | vmsnap CPU-s save / restore |")
    print("|---|---|---|---|---|")
    for t, s in summary.items():
        def cell(k: str, s=s) -> str:
            return f"{s[k]['median']:.2f} [{s[k]['min']:.2f}-{s[k]['max']:.2f}]"
        print(f"| {t} | {cell('save_s')} | {cell('restore_s')} | "
              f"{gib / s['save_s']['median']:.2f} / {gib / s['restore_s']['median']:.2f} | "
              f"{s['save_cpu_s']['median']:.1f} / {s['restore_cpu_s']['median']:.1f} |")
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-ceph.json"
    out.write_text(json.dumps({"memory_mb": args.memory_mb, "targets": targets, "runs": runs,
                               "summary": summary}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
