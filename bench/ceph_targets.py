#!/usr/bin/env python3
"""Save, eager restore and lazy restore of one guest through a local file, an RBD image and
S3 (Ceph RGW), in the same run, interleaved.

    .venv/bin/python bench/ceph_targets.py [--memory-mb 4096] [--reps 3] [--dir /var/tmp/...]

Starts the one-node Ceph (scripts/ceph.sh; stopped at the end if this started it). Per rep,
for each target in turn (file, rbd, s3, file, ...): boot a bootguest `mode=random` (every
page non-zero, QEMU 7.2, KVM), `vmsnap save --json` (paused save of the running guest,
durable: fsync / RBD snapshot / S3 manifest); then restore it twice into fresh
`-incoming defer` QEMUs:

  eager   `vmsnap restore --json --qmp`
  lazy    `vmsnap restore --json --lazy=postcopy --qmp` (the guest runs at once, its pages
          come on request and in the background)

each after the stored bytes left the page cache (the snapshot file, or the OSD's block file;
bluestore's own 128 MiB cache stays), every page of the guest checked after.
Lazy figures: running = vmsnap spawned -> its "running" event arrives (time to a running
guest); done = spawned -> exit (every page resident); page-request latency p50/p99 =
request received -> its pages sent (vmsnap's figure, one per request). Medians of the reps;
every rep, the load average and the busiest other processes go to bench/results/.
The images and objects written are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import evict_file, run_child, summarize, timed_restore  # noqa: E402
from testbed.ceph import (  # noqa: E402
    BUCKET,
    POOL,
    ceph_sh,
    client_env,
    remove_image,
    remove_objects,
    state_dir,
)
from testbed.guests import BootGuest  # noqa: E402
from testbed.qemu import Vm  # noqa: E402

VMSNAP = str(Path(sys.executable).with_name("vmsnap"))
FIGURES = ("save_s", "eager_s", "lazy_running_s", "lazy_done_s", "lazy_p50_us",
           "lazy_p99_us", "lazy_requests", "save_cpu_s", "eager_cpu_s")


def evict(target: str, url: str) -> None:
    evict_file(Path(url) if target == "file" else state_dir() / "osd.block")


def lazy_restore(url: str, qmp: Path, env: dict[str, str]) -> dict:
    """`vmsnap restore --lazy=postcopy`, timing its "running" event as it arrives."""
    running, end, done, _ = timed_restore(
        [VMSNAP, "restore", "--json", "--lazy=postcopy", url, "--qmp", str(qmp)],
        {**os.environ, **env}, time.monotonic())
    return {"lazy_running_s": running, "lazy_done_s": end,
            "lazy_p50_us": done.get("latency_p50_us"), "lazy_p99_us": done.get("latency_p99_us"),
            "lazy_requests": done.get("requests"), "lazy_vmsnap_running_s":
            done.get("running_seconds")}


def one(target: str, url: str, memory_mb: int, wd: Path) -> dict:
    guest = BootGuest(memory_mb=memory_mb, mode="random")
    config = guest.config("7.2", wd)
    env = {"TMPDIR": str(wd)}
    with Vm(config, wd, "src") as src:
        guest.boot(src)  # saved running (vmsnap pauses it): a lazy restore runs the guest
        with guest.saving(src) as saved:
            save = run_child([VMSNAP, "save", "--json", "--force", "--qmp",
                              str(src.tool_qmp_path), url], env=env)
        if save.returncode:
            raise RuntimeError(f"{target} save: {save.stderr.strip()[-400:]}")
    fig = {"save_s": save.seconds, "save_cpu_s": save.cpu_seconds, "load": os.getloadavg()}
    with Vm(config, wd, "eager", incoming="defer") as dst:
        evict(target, url)
        eager = run_child([VMSNAP, "restore", "--json", "--paused", url, "--qmp",
                           str(dst.tool_qmp_path)], env=env)
        if eager.returncode:
            raise RuntimeError(f"{target} restore: {eager.stderr.strip()[-400:]}")
        fig["eager_check"] = guest.check_restored(dst, saved).describe()
    fig.update(eager_s=eager.seconds, eager_cpu_s=eager.cpu_seconds)
    with Vm(config, wd, "lazy", incoming="defer") as dst:
        evict(target, url)
        fig.update(lazy_restore(url, dst.tool_qmp_path, env))
        fig["lazy_check"] = guest.check_restored(dst, saved, resumed=True).describe()
    return fig


def busiest() -> list[str]:
    """The busiest processes right now (the machine is shared)."""
    out = subprocess.run(["ps", "-eo", "pcpu,rss,etime,args", "--sort=-pcpu"],
                         capture_output=True, text=True).stdout.splitlines()
    return [line[:160] for line in out[1:13]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-mb", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vmsnap-bench-ceph"))
    args = ap.parse_args()
    args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    was_running = ceph_sh("status").returncode == 0
    started = ceph_sh("start")
    if started.returncode:
        raise SystemExit(f"scripts/ceph.sh start: {started.stderr.strip()}")
    os.environ.update(client_env())
    tag = uuid.uuid4().hex[:8]
    targets = {"file": str(args.dir / "vm.snap"), "rbd": f"rbd:{POOL}/bench-{tag}",
               "s3": f"s3://{BUCKET}/bench-{tag}/vm.snap"}
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    failures: list[str] = []
    context = {"start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_start": os.getloadavg(), "busiest_start": busiest()}
    try:
        for rep in range(args.reps):
            for target, url in targets.items():
                wd = args.dir / f"{target}-{rep}"
                wd.mkdir(mode=0o700, exist_ok=True)
                try:
                    r = one(target, url, args.memory_mb, wd)
                except (RuntimeError, OSError, AssertionError) as e:  # shared host: go on
                    print(f"rep {rep} {target}: FAILED: {e}", flush=True)
                    failures.append(f"rep {rep} {target}: {e}")
                    continue
                print(f"rep {rep} {target}: save {r['save_s']:.2f}s eager {r['eager_s']:.2f}s "
                      f"lazy running {r['lazy_running_s']:.2f}s done {r['lazy_done_s']:.2f}s "
                      f"p50/p99 {r['lazy_p50_us']:.0f}/{r['lazy_p99_us']:.0f} us "
                      f"({r['lazy_requests']} requests) load {r['load'][0]:.1f}", flush=True)
                runs[target].append(r)
            context[f"busiest_rep{rep}"] = busiest()
    finally:
        context.update(load_end=os.getloadavg(), end=time.strftime("%H:%M:%SZ", time.gmtime()))
        remove_image(POOL, f"bench-{tag}")
        remove_objects(BUCKET, f"bench-{tag}/")
        Path(targets["file"]).unlink(missing_ok=True)
        Path(f"{targets['file']}.hot").unlink(missing_ok=True)
        if not was_running:
            ceph_sh("stop")
    summary = {t: {k: summarize([r[k] for r in rs]) for k in FIGURES} for t, rs in runs.items()}
    gib = args.memory_mb / 1024
    print(f"\n{gib:g} GiB bootguest mode=random, QEMU 7.2 + KVM; seconds, median "
          f"of {args.reps} [min-max]; load average {context['load_start'][0]:.1f} at the "
          f"start, {context['load_end'][0]:.1f} at the end")
    print("| target | save | eager restore | lazy: running | lazy: all in | "
          "request p50 / p99 (us) | requests |")
    print("|---|---|---|---|---|---|---|")
    for t, s in summary.items():
        if not runs[t]:
            continue

        def cell(k: str, s=s) -> str:
            return f"{s[k]['median']:.2f} [{s[k]['min']:.2f}-{s[k]['max']:.2f}]"
        print(f"| {t} | {cell('save_s')} | {cell('eager_s')} | {cell('lazy_running_s')} | "
              f"{cell('lazy_done_s')} | {s['lazy_p50_us']['median']:.0f} / "
              f"{s['lazy_p99_us']['median']:.0f} | {s['lazy_requests']['median']:.0f} |")
    out = ROOT / "bench" / "results" / (f"{time.strftime('%Y%m%d-%H%M%S')}-ceph-"
                                        f"{args.memory_mb}m.json")
    out.write_text(json.dumps({"memory_mb": args.memory_mb, "reps": args.reps,
                               "targets": targets, "context": context, "runs": runs,
                               "failures": failures, "summary": summary}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
