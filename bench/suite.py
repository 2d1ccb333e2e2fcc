"""vmsnap against its peers: save (durable) and cold restore of real guests.

    bench/run [--quick] [--reps N] [--guests paused,zero,live] [--methods ...] [--dir DIR]

Methods run interleaved (A B C A B C ...), each repetition on a freshly booted guest; the
table shows medians [min-max], the JSON in bench/results/ keeps every repetition.
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
import traceback
from pathlib import Path

from rich.console import Console

from bench.common import compiled_vmsnap, summarize
from bench.methods import Context, Method, Scenario, Virsh, all_methods
from bench.report import chart, print_tables, print_targets, ratios, targets
from testbed.guests import BootGuest, LinuxGuest
from testbed.qemu import kill_leftovers

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
console = Console(width=None if sys.stdout.isatty() else 150)


def scenarios(quick: bool, scale: float = 1.0) -> dict[str, Scenario]:
    """The three guests; --quick shrinks them to smoke-test sizes, --scale multiplies RAM."""
    sizes = (512, 1024, 128, 512, 256) if quick else (4096, 8192, 1024, 2048, 1024)
    p_mb, z_mb, z_used, l_mb, l_fill = (max(64, int(x * scale) // 64 * 64) for x in sizes)
    rate = 150
    return {
        "paused": Scenario(
            "paused", f"{p_mb} MiB random, paused (QEMU 7.2 KVM bootguest)",
            lambda: BootGuest(mode="random", memory_mb=p_mb), "7.2", False,
            p_mb * MiB, p_mb * MiB),
        "zero": Scenario(
            "zero", f"{z_mb} MiB, {z_used} MiB used, paused (QEMU 7.2 KVM bootguest)",
            lambda: BootGuest(mode="random", memory_mb=z_mb, limit_mb=z_used), "7.2", False,
            z_mb * MiB, z_used * MiB),
        # Linux live under QEMU 7.2 + TCG is unsound (README), and the bootguest's dirty rate
        # cannot be set: the Linux guest dirties at a set rate on QEMU 10 (TCG).
        "live": Scenario(
            "live", f"live, {l_mb} MiB Linux, {l_fill} MiB filled, dirtying {rate} MB/s "
                    "(QEMU 10 TCG)",
            lambda: LinuxGuest(memory_mb=l_mb, fill_mb=l_fill, mode="dirty", rate_mb_s=rate),
            "10", True, l_mb * MiB, l_fill * MiB),
    }


def rotated(methods: list[Method], rep: int) -> list[Method]:
    """The methods in repetition `rep`'s order: rotated by one each repetition, so that no
    method always runs right after the same one (on this virtual disk a read's speed
    depends on what was written and read before it); fio stays last (it moves the bytes
    vmsnap found in the same repetition)."""
    head = [m for m in methods if not m.name.startswith("fio")]
    k = rep % len(head) if head else 0
    return head[k:] + head[:k] + [m for m in methods if m.name.startswith("fio")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny guests, 1 repetition (smoke test)")
    p.add_argument("--reps", type=int, help="repetitions per method (default 3, --quick 1)")
    p.add_argument("--guests", default="paused,zero,live", help="comma list of: paused,zero,live")
    p.add_argument("--methods", help="comma list (default all): vmsnap-chN, exec-cat, virsh, "
                                     "vmsnap-domain[-chN], qemu10, fio")
    p.add_argument("--channels", help="vmsnap channel counts, e.g. 0,2,4 (default: 0, plus 2,4 "
                                      "when `vmsnap save --channels` exists)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every guest's RAM (e.g. 0.25 on a small host)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/vmsnap-bench"),
                   help="work directory on the disk under test (default /var/tmp/vmsnap-bench)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where JSON and PNG go")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root (drop_caches, libvirtd, QEMU 10 chroot)")
    reps = args.reps or (1 if args.quick else 3)
    scen_all = scenarios(args.quick, args.scale)
    guests = [g.strip() for g in args.guests.split(",") if g.strip()]
    for g in guests:
        if g not in scen_all:
            p.error(f"unknown guest {g!r}; choose from {', '.join(scen_all)}")
    chans = [int(c) for c in args.channels.split(",")] if args.channels else None
    methods_all = all_methods(chans)
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        names = ["vmsnap-ch0" if n == "vmsnap" else n for n in names]
        if extra := [n for n in names if n.startswith("vmsnap-ch") and n not in methods_all]:
            methods_all.update(all_methods([int(n[9:]) for n in extra]))
        for n in names:
            if n not in methods_all:
                p.error(f"unknown method {n!r}; choose from {', '.join(methods_all)}")
        methods = [methods_all[n] for n in names]
    else:
        methods = list(methods_all.values())

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not args.dir.exists():
        args.dir.mkdir(mode=0o711, parents=True)
    root = args.dir / stamp
    root.mkdir(mode=0o711)  # libvirt's QEMU (user libvirt-qemu) writes RAM dumps below it
    ctx = Context(root=root, present_bytes={}, vmsnap_env=compiled_vmsnap())
    if any(isinstance(m, Virsh) for m in methods):
        ctx.libvirt = _start_libvirt(ctx)
    t_start = time.monotonic()
    lv = ctx.libvirt
    record = {"started": stamp, "quick": args.quick, "scale": args.scale, "reps": reps,
              "dir": str(args.dir), "host": _host(args.dir),
              "libvirt": {"unavailable": lv} if isinstance(lv, str) else ctx.libvirt_version,
              "methods": {m.name: m.label for m in methods}, "scenarios": {}}
    try:
        for g in guests:
            scen = scen_all[g]
            console.rule(f"[bold]{scen.label}")
            runs: dict[str, list] = {m.name: [] for m in methods}
            skipped = {m.name: r for m in methods if (r := m.unsupported(scen, ctx))}
            for rep in range(reps):
                for m in rotated(methods, rep):
                    if m.name in skipped:
                        continue
                    runs[m.name].append(_one(scen, m, ctx, rep))
            record["scenarios"][g] = {
                "label": scen.label, "ram_bytes": scen.ram_bytes, "used_bytes": scen.used_bytes,
                "live": scen.live, "skipped": skipped, "runs": runs,
                "summary": {name: _summary(r) for name, r in runs.items() if r}}
            record["scenarios"][g]["ratios"] = ratios(record["scenarios"][g]["summary"])
    finally:
        kill_leftovers()
        if ctx.libvirt is not None and not isinstance(ctx.libvirt, str):
            ctx.libvirt.close()
        shutil.rmtree(root, ignore_errors=True)
    record["elapsed_s"] = round(time.monotonic() - t_start, 1)
    record["targets"] = targets(record)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("-quick" if args.quick else "") + (f"-x{args.scale:g}" if args.scale != 1 else "")
    json_path = args.out / f"{stamp}{tag}.json"
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    png_path = json_path.with_suffix(".png")
    print_tables(console, record)
    print_targets(console, record["targets"])
    try:
        chart(record, png_path)
    except ImportError:  # matplotlib comes with `scripts/install.sh --bench`
        console.print(f"wrote {json_path} ({record['elapsed_s']:.0f} s); no chart: "
                      "matplotlib is missing (scripts/install.sh --bench)")
        return 0
    console.print(f"wrote {json_path} and {png_path} ({record['elapsed_s']:.0f} s)")
    return 0


def _one(scen: Scenario, m, ctx: Context, rep: int) -> dict:
    wd = ctx.root / f"{scen.key}-{m.name}-{rep}"
    wd.mkdir(mode=0o700)
    t0 = time.monotonic()
    try:
        result = {"ok": True, **m.run(scen, ctx, wd)}
        rate = result.get("dirty_rate_mb_s")
        console.print(f"  rep {rep + 1} {m.label:<26} save {result['save_s']:7.2f} s   "
                      f"restore {result['restore_s']:7.2f} s   {result.get('check', '')}"
                      + (f"   (guest dirtied {rate} MB/s before the save)" if rate else ""))
    except Exception as err:  # noqa: BLE001 - one failed run must not end the suite
        msg = " ".join(str(err).split())[:500] or type(err).__name__
        console.print(f"  rep {rep + 1} {m.label:<26} [red]FAILED[/red]: {msg}")
        result = {"ok": False, "error": msg, "traceback": traceback.format_exc()[-2000:]}
    finally:
        kill_leftovers()
        shutil.rmtree(wd, ignore_errors=True)
    result["rep"] = rep
    result["elapsed_s"] = round(time.monotonic() - t0, 2)
    return result


NUMERIC = ("dirty_rate_mb_s", "save_s", "restore_s", "apparent_bytes", "allocated_bytes",
           "cache_growth_bytes", "save_cpu_s", "save_max_rss_bytes", "restore_cpu_s",
           "restore_max_rss_bytes", "restore_load_s", "restore_qemu_cpu_s",
           "restore_qemu_main_cpu_s", "restore_qemu_thp_mb")


def _summary(runs: list[dict]) -> dict:
    good = [r for r in runs if r.get("ok")]
    out = {"ok": len(good), "failed": len(runs) - len(good),
           "errors": sorted({r["error"] for r in runs if not r.get("ok")})}
    for key in NUMERIC:
        s = summarize([r.get(key) for r in good])
        if s:
            out[key] = s
    return out


def _start_libvirt(ctx: Context):
    """A private libvirtd with Debian's default qemu.conf (QEMU as libvirt-qemu)."""
    try:
        from testbed.libvirt import Libvirtd, LibvirtUnavailable
    except ImportError as err:  # libvirt-python missing
        return str(err)
    daemon = Libvirtd(ctx.root / "libvirtd", "debian")
    try:
        daemon.start()
        ctx.libvirt_version = daemon.version
        return daemon
    except (LibvirtUnavailable, OSError, subprocess.SubprocessError) as err:
        daemon.close()
        console.print(f"[yellow]libvirt unavailable: {err}")
        return str(err)


def _host(directory: Path) -> dict:
    fs = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(directory)],
                        capture_output=True, text=True).stdout.split()
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "filesystem": fs, "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())
