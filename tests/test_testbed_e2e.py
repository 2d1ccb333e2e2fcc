"""The test bed proves itself: QEMU's own exec:cat migration round trip passes the RAM check
for both guests and both QEMU versions, and a single corrupted page is caught."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import testbed.qemu as qemu_mod
from testbed.cases import make_guest, round_trip_params
from testbed.guests import BootGuest, GuestCheckFailed, shared_ram_args
from testbed.qemu import QemuError, Vm, exec_uri
from testbed.streams import page_data_positions
from testbed.transfer import save_with_cat


@pytest.mark.qemu
@round_trip_params()
def test_exec_cat_round_trip(kind, live, qemu, workdir):
    guest = make_guest(kind, live)
    config = guest.config(qemu, workdir)
    stream = workdir / "stream"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        with guest.saving(vm) as saved:
            save_with_cat(vm, stream, live)
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", stream)) as vm:
        vm.wait_incoming()
        guest.check_restored(vm, saved)


@pytest.mark.qemu
def test_bootguest_working_set(qemu_version, workdir):
    """ws_mb=N: after READY the guest sweeps only N MiB of pages scattered over all its RAM
    (every stride-th page), the others keep their first stamp; the RAM check knows which
    (the guest's WORKSET line) before and after an exec:cat round trip."""
    guest = BootGuest(memory_mb=256, mode="random", ws_mb=4)
    config = guest.config(qemu_version, workdir)
    stream = workdir / "stream"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        assert guest.workset is not None
        stride, count = guest.workset
        assert count == 4 << 8 and stride == sum(e - s for s, e in guest.ranges) // 4096 // count
        checked = guest.check(vm)
        assert checked.first_counter > 2 and checked.pages_checked > 60 * count, checked
        with guest.saving(vm) as saved:
            save_with_cat(vm, stream, live=False)
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", stream)) as vm:
        vm.wait_incoming()
        assert guest.check_restored(vm, saved).first_counter > checked.first_counter


@pytest.mark.qemu
@pytest.mark.parametrize("ws_mb", [None, 8], ids=["all-ram", "working-set"])
def test_ram_check_catches_one_corrupted_page(ws_mb, qemu_version, workdir):
    """The victim, in the middle of RAM, is outside the working set of a ws_mb guest: a page
    that never moves after READY is still checked."""
    guest = BootGuest(memory_mb=256, ws_mb=ws_mb)
    config = guest.config(qemu_version, workdir)
    stream = workdir / "stream"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        with guest.saving(vm) as saved:
            save_with_cat(vm, stream, live=False)
    start, end = guest.ranges[0]
    victim = start + ((end - start) // 2 & ~0xFFF)
    if guest.workset:
        assert (victim - start) // 4096 % guest.workset[0], "the victim is in the working set"
    position = page_data_positions(stream)[victim]
    with open(stream, "r+b") as f:
        f.seek(position)
        counter = f.read(1)[0]
        f.seek(position)
        f.write(bytes([(counter + 0x55) & 0xFF]))
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", stream)) as vm:
        vm.wait_incoming()
        with pytest.raises(GuestCheckFailed, match=f"{victim:#x}"):
            guest.check_restored(vm, saved)


@pytest.mark.qemu
@pytest.mark.parametrize("mode", ["counter", "random"])
@pytest.mark.parametrize("how", ["zeroed", "stale"])
def test_ram_check_catches_ram_restored_wrong_as_a_whole(mode, how, workdir):
    """The restored RAM's counters are set back to zero, or by 5 sweeps, all at once (in the
    shared file backing the destination's RAM, before it runs; the moving edge kept where
    the guest will go on stamping): self-consistent RAM. Once the guest has run, its own
    re-stamping hides that from the one-moving-edge rule (the check made before `saved`
    existed passes); check_restored, comparing with the save while the VM is still paused,
    fails."""
    guest = BootGuest(memory_mb=128, mode=mode)
    config = guest.config("7.2", workdir)
    stream = workdir / "stream"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        with guest.saving(vm) as saved:
            save_with_cat(vm, stream, live=False)
    assert saved.exact is not None and saved.exact.ok
    config.args += shared_ram_args("file", 128, workdir / "ram")
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", stream)) as vm:
        vm.wait_incoming()
        ram = np.memmap(workdir / "ram", dtype="<u8", mode="r+")
        back = saved.exact.last_counter if how == "zeroed" else 5  # the edge's side: 0
        for start, end in guest.ranges:
            counters = ram[start // 8:end // 8:512]
            counters -= back
        ram.flush()
        del ram
        with pytest.raises(GuestCheckFailed, match="never stamped" if how == "zeroed"
                           else "differs from the save"):
            guest.check_restored(vm, saved)
        vm.cont()  # what check_restored did before: run, then the one-moving-edge rule
        guest.wait_alive(vm)
        assert guest.check(vm).ok


@pytest.mark.qemu
def test_a_stuck_qemu_never_hangs_the_test_bed(workdir, monkeypatch):
    """A QEMU whose monitor never answers (a vCPU that cannot be paused, left faulting on
    its own page tables by a lazy restore killed early, makes `stop` wait forever; here
    SIGSTOP stands in for it) costs a test its timeouts, never the run: a command fails
    with one line naming that QEMU, and closing the VM kills it and says why."""
    monkeypatch.setattr(qemu_mod, "QMP_TIMEOUT", 1.0)
    monkeypatch.setattr(qemu_mod, "QUIT_TIMEOUT", 1.0)
    vm = Vm(BootGuest(memory_mb=64).config("7.2", workdir), workdir, "stuck")
    t0 = time.monotonic()
    with pytest.raises(QemuError, match=r"'stuck' .*quit within 1s .*killed with SIGKILL"):
        with vm:
            os.kill(vm.pid, signal.SIGSTOP)
            with pytest.raises(QemuError, match=r"'stuck' .*answer QMP stop within 1s"):
                vm.stop()
    assert time.monotonic() - t0 < 30
    assert vm.proc.poll() == -signal.SIGKILL


#: a process whose leader thread ends first (pthread_exit) while another lives on until its
#: standard input closes, as a QEMU's last thread frees its RAM after its leader ended
_LEADER_FIRST = """
import ctypes, os, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0))).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_is_alive_until_its_last_thread_ends():
    """A QEMU vmsnap launched (adopted, not the test bed's child) counts as gone only once
    its last thread ended, not when its leader turned zombie: an 8 GiB QEMU's last thread
    frees its RAM for ~0.6 s more, which the next timed restore would share the CPUs with."""
    proc = subprocess.Popen([sys.executable, "-c", _LEADER_FIRST], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the leader thread did not end"
            time.sleep(0.01)
        time.sleep(0.1)
        assert qemu_mod.process_alive(proc.pid)  # its other thread waits on stdin
    finally:
        proc.stdin.close()
    qemu_mod._wait_dead(proc.pid)
    assert not qemu_mod.process_alive(proc.pid)
    assert proc.wait(10) == 0
