"""vmsnap's offline verbs end to end on real QEMU: a guest saved with `vmsnap receive FILE`
(QEMU's `migrate exec:`) and restored with `vmsnap send FILE` (`-incoming exec:`) passes its
RAM check — both guests, both QEMU versions, paused and live.

QEMU 7.2 runs on the host and runs vmsnap itself; QEMU 10 runs in a chroot without vmsnap, so
there QEMU's `exec:cat` talks to a host vmsnap through a FIFO in the (bind-mounted) workdir.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from testbed.cases import make_guest, round_trip_params
from testbed.qemu import Vm, exec_uri
from testbed.transfer import VMSNAP, restore_with_vmsnap, save_with_cat, save_with_vmsnap

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MIB = 1 << 20


def vmsnap(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([VMSNAP, *map(str, args)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert not proc.stderr, proc.stderr
    return proc


def check_file(snap: Path, mostly_zero: bool) -> dict:
    """`info --json` is sane and `verify` passes; returns the info."""
    info = json.loads(vmsnap("info", "--json", snap).stdout)
    assert info["format"] == "vmsnap" and info["integrity"] == "complete, checksummed"
    assert info["machine_type"].startswith("pc-q35-")
    ram = next(b for b in info["blocks"] if b["name"] == "pc.ram")
    assert ram["present_pages"] > 0
    assert info["present_bytes"] > 0
    nblocks = len(info["blocks"])
    present_pages = info["present_bytes"] // 4096
    trailer = 8 * present_pages + 64 * 1024  # checksum table + JSON + commit record
    # the file never outgrows RAM + metadata (1 MiB alignment per block, device state, trailer)
    assert info["apparent_size"] <= info["ram_bytes"] + nblocks * MIB + MIB + trailer, info
    # holes stay holes: only present pages and metadata take disk space
    assert info["allocated_size"] <= info["present_bytes"] + 2 * MIB + trailer, info
    if mostly_zero:
        assert info["allocated_size"] < info["apparent_size"] // 2, info
    assert b"OK" in vmsnap("verify", snap).stdout
    return info


@round_trip_params()
def test_receive_then_send_restores(kind, live, qemu, workdir):
    guest = make_guest(kind, live, boot_limit_mb=64)  # a mostly-zero guest
    config = guest.config(qemu, workdir)
    snap = workdir / "guest.vms"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        with guest.saving(vm) as saved:
            save_with_vmsnap(vm, snap, live)
    info = check_file(snap, mostly_zero=kind == "boot")
    print(f"{kind} {'live' if live else 'paused'} qemu{qemu}: apparent "
          f"{info['apparent_size']:,} allocated {info['allocated_size']:,} present "
          f"{info['present_bytes']:,}")
    restore_with_vmsnap(guest, config, workdir, snap, saved)


def test_import_export_round_trip(workdir):
    """A plain exec:cat stream (live, QEMU 10), imported to a snapshot and exported back,
    restores the guest through exec:cat."""
    guest = make_guest("boot", live=True)
    config = guest.config("10", workdir)
    stream, snap, back = workdir / "stream", workdir / "guest.vms", workdir / "exported"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        with guest.saving(vm) as saved:
            save_with_cat(vm, stream, live=True)
    vmsnap("import", stream, snap)
    check_file(snap, mostly_zero=True)
    vmsnap("export", snap, back)
    assert back.stat().st_size <= stream.stat().st_size  # each page once, zero pages skipped
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", back)) as vm:
        vm.wait_incoming()
        guest.check_restored(vm, saved)
