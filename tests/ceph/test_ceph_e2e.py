"""Save to and restore from Ceph through the CLI on real QEMU (bootguest under KVM, and the
Linux guest under TCG): rbd: and
s3:// on QEMU 7.2 and 10, restored eagerly and lazily (postcopy; hot pages first the second
time; mmap refused). The save runs as one "host" (its own scratch directory) and the
restore as another (a clean directory, nothing but the URL); guest RAM is checked. Faults:
radosgw or the OSD killed mid-save (old snapshot intact, VM back in its run state), wrong
credentials (one line, VM untouched), a deleted chunk (one line naming the page)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

import vmsnap
from testbed.ceph import ceph_sh, daemon_pid
from testbed.guests import BootGuest, LinuxGuest
from testbed.qemu import Vm
from vmsnap import targets

pytestmark = pytest.mark.qemu


def vmsnap_cli(cwd: Path, *args, env: dict | None = None, timeout: float = 600,
               **popen) -> subprocess.CompletedProcess:
    """The vmsnap CLI as a separate "host": its own cwd and TMPDIR, the cluster's client
    environment only."""
    env = {**os.environ, "TMPDIR": str(cwd), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vmsnap.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout, **popen)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"vmsnap failed ({r.returncode}): {r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def host(workdir: Path, name: str) -> Path:
    d = workdir / name
    d.mkdir(mode=0o700)
    return d


@pytest.mark.parametrize("qemu", ["7.2", "10"], ids=lambda q: f"qemu{q}")
@pytest.mark.parametrize("kind", ["rbd", "s3"])
def test_save_here_restore_there(kind, qemu, workdir, request):
    url = request.getfixturevalue(f"{kind}_url")
    guest = BootGuest(memory_mb=256)
    a, b = host(workdir, "a"), host(workdir, "b")
    with Vm(guest.config(qemu, a), a, "src") as src:
        guest.boot(src)
        guest.wait_alive(src)
        with guest.saving(src) as saved:
            ok(vmsnap_cli(a, "save", "--qmp", src.tool_qmp_path, url))
        assert src.status() in ("paused", "postmigrate")
        assert one_line_error(vmsnap_cli(a, "save", "--qmp", src.tool_qmp_path, url)) \
            .endswith("exists (use --force to overwrite)")
    assert not any(a.glob("*.partial"))
    info = json.loads(ok(vmsnap_cli(b, "info", "--json", url)).stdout.splitlines()[-1])
    assert info["path"] == url and info["integrity"] == "complete, checksummed"
    assert info["allocated_size"] is None
    ok(vmsnap_cli(b, "verify", url))
    with Vm(guest.config(qemu, b), b, "dst", incoming="defer") as dst:
        ok(vmsnap_cli(b, "restore", url, "--paused", "--qmp", dst.tool_qmp_path))
        guest.check_restored(dst, saved)
    assert one_line_error(vmsnap_cli(b, "restore", url, "--lazy=mmap")).endswith(
        f"--lazy=mmap maps a local file; {url} is remote: use --lazy=postcopy")
    for attempt in (1, 2):  # the second one sends the pages the first was asked for first
        with Vm(guest.config(qemu, b), b, f"lazy{attempt}", incoming="defer") as dst:
            r = ok(vmsnap_cli(b, "restore", "--json", "--lazy", url, "--qmp",
                              dst.tool_qmp_path))
            done = json.loads(r.stdout.splitlines()[-1])
            assert done["event"] == "done" and done["engine"] == "postcopy"
            assert 0 < done["running_seconds"] < done["seconds"]
            assert done["requests"] > 0 and done["latency_p50_us"] > 0
            assert (done["hot_pages"] > 0) == (attempt == 2), done["hot_pages"]
            assert dst.cmd("query-migrate")["status"] == "completed"
            guest.check_restored(dst, saved, resumed=True)
    assert not [p.name for p in b.iterdir() if p.name.startswith(("rbd:", "s3:"))]


@pytest.mark.parametrize("kind", ["rbd", "s3"])
def test_linux_guest_eager_and_lazy(kind, workdir, request):
    """The Linux guest (QEMU 10, TCG) saved on one host to each target, restored on another
    eagerly and lazily; memfill's VERIFY checks its RAM after each."""
    url = request.getfixturevalue(f"{kind}_url")
    guest = LinuxGuest(memory_mb=384, fill_mb=128)
    a, b = host(workdir, "a"), host(workdir, "b")
    with Vm(guest.config("10", a), a, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            ok(vmsnap_cli(a, "save", "--qmp", src.tool_qmp_path, url))
    for how in ("--paused", "--lazy"):  # a lazy restore runs the guest
        with Vm(guest.config("10", b), b, "dst", incoming="defer") as dst:
            ok(vmsnap_cli(b, "restore", url, how, "--qmp", dst.tool_qmp_path))
            guest.check_restored(dst, saved, resumed=how == "--lazy")


#: librados waits this long for a dead OSD (scripts/ceph.sh sets 60 s) in the OSD test
OSD_TIMEOUT = 5


@pytest.mark.parametrize(("kind", "daemon"), [("s3", "radosgw"), ("rbd", "osd")])
def test_daemon_killed_mid_save(kind, daemon, workdir, request):
    """radosgw or the OSD SIGKILLed while pages flow: the save fails in one line, the old
    snapshot stays the snapshot (nothing partial is taken for it), the VM runs again; the
    daemon is restarted with scripts/ceph.sh start."""
    url = request.getfixturevalue(f"{kind}_url")
    guest = BootGuest(memory_mb=512, mode="random")
    a = host(workdir, "a")
    with Vm(guest.config("7.2", a), a, "src") as src:
        guest.boot(src)
        ok(vmsnap_cli(a, "save", "--resume", "--qmp", src.tool_qmp_path, url))
        with vmsnap.open(url) as old:
            created = old.metadata.created
        env = {**os.environ, "TMPDIR": str(a)}
        if daemon == "osd":
            env["CEPH_ARGS"] = (f"--rados_osd_op_timeout={OSD_TIMEOUT} "
                                f"--rados_mon_op_timeout={OSD_TIMEOUT}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmsnap.cli", "save", "--json", "--force", "--resume",
             "--qmp", str(src.tool_qmp_path), url], cwd=a, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for line in proc.stdout:  # pages are flowing: kill the daemon
                if json.loads(line)["event"] == "progress":
                    os.kill(daemon_pid(daemon), signal.SIGKILL)
                    break
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=120)
            failed_after = time.monotonic() - t0
        finally:
            proc.kill()
            restart = ceph_sh("start")
        assert proc.returncode == 1 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and url in err, err  # names the cause
        assert failed_after < 6 * OSD_TIMEOUT, failed_after  # three timeouts in a row, and slack
        assert restart.returncode == 0, restart.stderr
        assert "stale" not in restart.stderr, restart.stderr  # the new daemon is the one up
        assert src.status() == "running"
        guest.wait_alive(src)
    with vmsnap.open(url) as snap:
        assert snap.metadata.created == created
        snap.verify()


def test_wrong_credentials_and_deleted_chunk(s3_url, workdir):
    guest = BootGuest(memory_mb=256)
    a = host(workdir, "a")
    with Vm(guest.config("7.2", a), a, "src") as src:
        guest.boot(src)
        bad = {"AWS_SECRET_ACCESS_KEY": "wrong"}
        line = one_line_error(vmsnap_cli(a, "save", "--qmp", src.tool_qmp_path, s3_url,
                                         env=bad))
        assert "access denied" in line and s3_url in line
        assert src.status() == "running"  # refused before the VM was touched
        ok(vmsnap_cli(a, "save", "--qmp", src.tool_qmp_path, s3_url))
    assert "access denied" in one_line_error(vmsnap_cli(a, "info", s3_url, env=bad))
    with vmsnap.open(s3_url) as snap:
        ram = snap.block("pc.ram")
        page = int(snap.present_runs(ram)[-1][0])
        foff = ram.pages_offset + page * ram.page_size
    r = targets.remote(s3_url)
    manifest = json.loads(boto3.client("s3").get_object(Bucket=r.container, Key=r.name)
                          ["Body"].read())
    chunk = manifest["chunk_size"]
    key = f"{manifest['prefix']}{foff // chunk * chunk:012x}"
    boto3.client("s3").delete_object(Bucket=r.container, Key=key)
    b = host(workdir, "b")
    with Vm(guest.config("7.2", b), b, "dst", incoming="defer") as dst:
        line = one_line_error(vmsnap_cli(b, "restore", s3_url, "--qmp", dst.tool_qmp_path))
        assert f"{key} is missing" in line and "'pc.ram' page at offset 0x" in line, line
