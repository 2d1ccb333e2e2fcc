"""Small helpers shared by the benchmark suite: page cache, file sizes, timed subprocesses."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.pagecache import evict as evict_file  # noqa: F401 - the bench scripts' name

REPO = Path(__file__).resolve().parents[1]


def sync_all() -> None:
    """Write back dirty data first, so the save's cache growth is its own (other processes'
    activity still adds noise: the host is shared)."""
    subprocess.run(["sync"], check=True)


def cached_bytes() -> int:
    """`Cached:` of /proc/meminfo, in bytes."""
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^Cached:\s+(\d+) kB", text, re.M).group(1)) * 1024


def file_sizes(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"apparent_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}


def qemu_usage(vm) -> dict[str, float] | None:
    """What the QEMU process of testbed Vm `vm` (found by its QMP socket on its command line)
    has used so far: CPU seconds (user+system) of all its threads ("cpu_s") and of its main
    thread ("main_cpu_s": a mapped-ram load with multifd busy-polls there for a free
    channel, QEMU 9-10's multifd_recv, so it grows with the load's length whoever wrote the
    file), and its guest RAM in transparent huge pages ("thp_mb", AnonHugePages: 4 KiB pages
    instead cost a fault each and split O_DIRECT reads). None if it cannot be found."""
    mark = str(vm.qmp_path).encode()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(b"qemu-system-x86_64") or not any(mark in a for a in argv):
                continue
            cpu = [Path(f"/proc/{pid}{task}/stat").read_text().rsplit(")", 1)[1].split()
                   for task in ("", f"/task/{pid}")]
            smaps = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        thp_kb = sum(int(line.split()[1]) for line in smaps
                     if line.startswith("AnonHugePages:"))
        total, main = ((int(f[11]) + int(f[12])) / tick for f in cpu)
        return {"cpu_s": total, "main_cpu_s": main, "thp_mb": round(thp_kb / 1024, 1)}
    return None


def sync_file(path: Path) -> None:
    """Make `path` durable (`sync -f` = syncfs of its filesystem, like the peers need)."""
    subprocess.run(["sync", "-f", str(path)], check=True)


@dataclass
class ChildRun:
    """A finished child process: wall seconds, its own CPU seconds and peak RSS (wait4)."""

    returncode: int
    seconds: float
    cpu_seconds: float
    max_rss_bytes: int
    stdout: str
    stderr: str


def _vm_hwm(pid: int | str) -> int:
    """VmHWM (peak RSS of the current address space) of a process, in bytes; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(argv: list[str], timeout: float = 1800.0,
              env: dict[str, str] | None = None) -> ChildRun:
    """Run argv, reaping it with wait4 so its CPU time is its own (not other children's).

    Peak RSS: Linux carries a process's RSS high-water mark across fork+exec, so wait4's
    ru_maxrss is max(this process's peak at fork, the child's own peak). When it does not
    exceed our own peak, the child's figure is its VmHWM, polled while it runs."""
    out_path = Path(f"/tmp/vmsnap-bench-{os.getpid()}-{time.monotonic_ns()}")
    inherited = _vm_hwm("self")
    with open(f"{out_path}.out", "w+b") as out, open(f"{out_path}.err", "w+b") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=None if env is None else {**os.environ, **env})
        deadline = t0 + timeout
        polled = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            polled = max(polled, _vm_hwm(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"{argv[:3]} still running after {timeout}s")
            time.sleep(0.005)
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        maxrss = ru.ru_maxrss * 1024
        out.seek(0)
        err.seek(0)
        result = ChildRun(proc.returncode, seconds, ru.ru_utime + ru.ru_stime,
                          maxrss if maxrss > inherited else polled,
                          out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))
    for suffix in (".out", ".err"):
        Path(f"{out_path}{suffix}").unlink(missing_ok=True)
    return result


def summarize(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def timed_restore(argv: list[str], env: dict[str, str], t0: float,
                  on_running: Callable[[], None] | None = None
                  ) -> tuple[float, float, dict, float]:
    """Run a `vmsnap restore --json ...` command line; return (seconds from `t0` to its
    "running" event, as it arrives; seconds to its end; its "done" event; its own CPU
    seconds, user+system, wait4). `on_running` is called as that event arrives (the command
    goes on: a lazy restore's pages)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stderr is not None
    running = None
    done: dict = {}
    for line in proc.stdout:
        e = json.loads(line)
        if e["event"] == "running" and running is None:
            running = time.monotonic() - t0
            if on_running is not None:
                on_running()
        elif e["event"] == "done":
            done = e
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed: {err.strip()[-400:]}")
    end = time.monotonic() - t0
    return (end if running is None else running), end, done, usage.ru_utime + usage.ru_stime


def compiled_vmsnap() -> dict[str, str]:
    """Environment entries that make `vmsnap` run as an installed vmsnap does: its modules
    compiled beforehand, next to their sources (pip compiles them at install; under a
    PYTHONDONTWRITEBYTECODE in the caller's environment each run would compile them all
    again, ~0.1 CPU-s per command: Python still reads what exists)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "vmsnap")],
                   check=True, stdout=subprocess.DEVNULL)
    return {"PYTHONPATH": str(REPO)}


def vmsnap_env(workdir: Path) -> dict[str, str]:
    """The whole environment to run `python -m vmsnap` in as an installed vmsnap runs
    (compiled_vmsnap), with `workdir` as its TMPDIR."""
    return {**os.environ, **compiled_vmsnap(), "TMPDIR": str(workdir)}
