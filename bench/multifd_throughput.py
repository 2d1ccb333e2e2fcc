"""Paused save throughput: vmsnap multifd receive (2, 4 channels) vs single channel.

    python bench/multifd_throughput.py [--memory-mb 2048] [--channels 0,2,4] [--reps 1]
                                       [--targets shm,disk] [--qemu 7.2]

Boots a random-mode BootGuest (KVM) once, pauses it, then saves it repeatedly (a paused
QEMU can migrate again from `postmigrate`) into a snapshot on /dev/shm and on disk.
Per run: wall time from `migrate` until the snapshot is committed (fsync + rename), GB/s
(1e9 bytes of present page data per second), vmsnap CPU seconds per GiB (getrusage
RUSAGE_SELF deltas: all threads of this process), and peak RSS (VmHWM, reset before each
run through /proc/self/clear_refs). Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.guests import BootGuest  # noqa: E402
from testbed.qemu import Vm  # noqa: E402
from vmsnap.fileformat.writer import SnapshotWriter  # noqa: E402
from vmsnap.ops.multifd_receive import identify_channels, receive_multifd  # noqa: E402
from vmsnap.ops.receive import receive  # noqa: E402


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def save_once(vm: Vm, workdir: Path, target: Path, channels: int) -> dict:
    sock_path = workdir / "bench.sock"
    if sock_path.exists():
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(channels + 1)
    caps = {"multifd": channels > 0}
    params = {"max-bandwidth": 1 << 40}
    if channels:
        params["multifd-channels"] = channels
    vm.set_migration(caps, params)
    reset_hwm()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    vm.cmd("migrate", uri=f"unix:{sock_path}")
    listener.settimeout(120)
    conns = [listener.accept()[0] for _ in range(channels + 1)]
    listener.close()
    for c in conns:
        c.settimeout(None)
    writer = SnapshotWriter(target)
    try:
        if channels:
            main, chans = identify_channels(conns)
            stats = receive_multifd(main, chans, writer)
        else:
            stats = receive(conns[0].makefile("rb", buffering=0), writer,
                            reply=conns[0].sendall)
        t1 = time.monotonic()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        vm.wait_migration(600)
    finally:
        for c in conns:
            c.close()
    data = os.path.getsize(target)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    page_bytes = stats.pages * 4096  # includes pages QEMU sent twice (7.2 duplicates)
    gib = page_bytes / (1 << 30)
    wall = t1 - t0
    return {"channels": channels, "wall_s": round(wall, 3),
            "GB_s": round(page_bytes / wall / 1e9, 3),
            "cpu_s": round(cpu, 3), "user_s": round(ru1.ru_utime - ru0.ru_utime, 3),
            "sys_s": round(ru1.ru_stime - ru0.ru_stime, 3),
            "cpu_s_per_GiB": round(cpu / gib, 3) if gib else None,
            "peak_rss_MiB": round(hwm() / (1 << 20), 1), "page_bytes": page_bytes,
            "file_bytes": data, "direct": stats.direct}


def serialize_writes() -> None:
    """--serialize: one global lock around every page write (the alternative to the
    per-call lock on bitmap state only), to measure what concurrent pwritev buys."""
    import threading
    lock = threading.Lock()
    orig = SnapshotWriter.write_aligned_pages

    def locked(self, *args, **kw):
        with lock:
            return orig(self, *args, **kw)

    SnapshotWriter.write_aligned_pages = locked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-mb", type=int, default=2048)
    ap.add_argument("--channels", default="0,2,4")
    ap.add_argument("--targets", default="shm,disk")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--qemu", default="7.2")
    ap.add_argument("--disk-dir", default=str(Path(__file__).resolve().parents[1] / "build"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--serialize", action="store_true")
    a = ap.parse_args()
    if a.serialize:
        serialize_writes()
    chans = [int(x) for x in a.channels.split(",")]
    targets = {"shm": Path("/dev/shm"), "disk": Path(a.disk_dir)}
    results = []
    with tempfile.TemporaryDirectory(prefix="vmsnap-mfd-bench-") as td:
        wd = Path(td)
        wd.chmod(0o700)
        guest = BootGuest(mode="random", memory_mb=a.memory_mb, accel="kvm")
        with Vm(guest.config(a.qemu, wd), wd, "src") as vm:
            t = time.monotonic()
            guest.boot(vm, timeout=900)
            print(f"guest ready in {time.monotonic() - t:.1f}s", flush=True)
            vm.stop()
            for _ in range(a.reps):
                for tname in a.targets.split(","):
                    for n in chans:  # interleaved
                        target = targets[tname] / f"vmsnap-mfd-bench-{os.getpid()}.snap"
                        if vm.status() == "postmigrate":  # may migrate again once resumed
                            vm.cont()
                            vm.stop()
                        try:
                            r = save_once(vm, wd, target, n)
                        finally:
                            if target.exists():
                                target.unlink()
                        r["target"] = tname
                        results.append(r)
                        print(json.dumps(r), flush=True)
    print(f"\n{'target':6} {'ch':>3} {'wall s':>7} {'GB/s':>6} {'CPU s':>6} {'CPU s/GiB':>9} "
          f"{'peak RSS MiB':>12} {'direct':>6}")
    for r in results:
        print(f"{r['target']:6} {r['channels']:>3} {r['wall_s']:>7} {r['GB_s']:>6} "
              f"{r['cpu_s']:>6} {r['cpu_s_per_GiB']:>9} {r['peak_rss_MiB']:>12} "
              f"{r['direct']!s:>6}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
