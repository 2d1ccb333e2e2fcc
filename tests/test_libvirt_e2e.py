"""vmsnap and a real libvirtd: `virsh save` / `managedsave` into a FIFO that `vmsnap import`
reads, and `vmsnap export --libvirt` images (a file, a FIFO) that `virsh restore` and
`virsh start` bring back — bootguest under KVM, RAM checked after every restore, under three
libvirt configurations (QEMU as root without namespaces, as root in a mount namespace, and
Debian's default: as libvirt-qemu with dynamic ownership). virsh's calls are made with
libvirt-python, the same API calls virsh makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

from testbed.craft import flip_page_bit
from testbed.guests import BootGuest
from testbed.libvirt import CONFIGS, Libvirtd, LibvirtVm, private_root
from testbed.transfer import VMSNAP
from vmsnap import open as vmsnap_open

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module", params=list(CONFIGS))
def daemon(request):
    root = private_root()
    with Libvirtd(root / "daemon", request.param) as d:
        d.work = root / "work"
        yield d
    subprocess.run(["rm", "-rf", "--", str(root)], check=False)


def vmsnap(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([VMSNAP, *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


class Call(threading.Thread):
    """A blocking libvirt call (it waits on a FIFO) run beside vmsnap; join() re-raises."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.start()

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except BaseException as err:  # noqa: BLE001 - handed to the joining test
            self.error = err

    def join(self, timeout: float | None = 300) -> None:
        super().join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} still blocked"
        if self.error:
            raise self.error


def booted_vm(daemon, name: str, persistent: bool = False):
    guest = BootGuest(memory_mb=128)
    cmdline = guest.config("7.2", daemon.work).args[-1]
    vm = LibvirtVm(daemon.conn, name, daemon.work / name, guest.memory_mb, cmdline)
    vm.define() if persistent else vm.create()
    guest.boot(vm)
    return guest, vm


def test_virsh_save_fifo_import_then_virsh_restore(daemon):
    name = f"lvimg-{os.getpid()}"
    guest, vm = booted_vm(daemon, name)
    work = vm.workdir
    try:
        fifo = work / "save.fifo"
        os.mkfifo(fifo, 0o600)
        snap = work / "vm.vms"
        with guest.saving(vm) as saved:
            save = Call(vm.dom.save, str(fifo))  # virsh save DOM FIFO
            vmsnap("import", fifo, snap)
            save.join()
        assert vm.state()[0] == libvirt.VIR_DOMAIN_NOSTATE  # transient: saved means gone
        vmsnap("verify", snap)

        image = work / "vm.img"  # virsh restore of an exported image file
        vmsnap("export", "--libvirt", snap, image)
        daemon.conn.restoreFlags(str(image), None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        assert vm.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        guest.check_restored(vm, saved)
        vm.destroy()

        fifo2 = work / "restore.fifo"  # virsh restore FIFO, vmsnap writing it
        os.mkfifo(fifo2, 0o600)
        restore = Call(daemon.conn.restoreFlags, str(fifo2), None,
                       libvirt.VIR_DOMAIN_SAVE_PAUSED)
        vmsnap("export", "--libvirt", snap, fifo2)
        restore.join()
        guest.check_restored(vm, saved)
    finally:
        vm.destroy()


@pytest.mark.parametrize("daemon", ["debian"], indirect=True)
def test_managedsave_fifo_import_then_start_from_export(daemon):
    """managedsave into a FIFO at libvirt's managed-save path, imported by vmsnap; then
    `virsh start` restores from that FIFO while vmsnap exports into it."""
    name = f"lvmsave-{os.getpid()}"
    guest, vm = booted_vm(daemon, name, persistent=True)
    try:
        managed = daemon.path(f"/var/lib/libvirt/qemu/save/{name}.save")
        os.mkfifo(managed, 0o600)
        snap = vm.workdir / "managed.vms"
        with guest.saving(vm) as saved:
            save = Call(vm.dom.managedSave)
            vmsnap("import", managed, snap)
            save.join()
        assert vm.state() == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED)
        assert vm.dom.hasManagedSaveImage()
        vmsnap("verify", snap)
        # virsh start --paused: restores from the managed-save FIFO
        start = Call(vm.dom.createWithFlags, libvirt.VIR_DOMAIN_START_PAUSED)
        vmsnap("export", "--libvirt", snap, managed)
        start.join()
        assert vm.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        guest.check_restored(vm, saved)
    finally:
        vm.destroy()
        Path(managed).unlink(missing_ok=True)


def vmsnap_domain(daemon, *args) -> subprocess.CompletedProcess:
    return vmsnap(*args[:1], "--connect", daemon.uri, *args[1:])


def events(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    """A --json run's events by name."""
    return {e["event"]: e for e in map(json.loads, proc.stdout.splitlines())}


def test_save_domain_every_mode_then_restore(daemon):
    """save --domain paused on 2 multifd channels / --resume / --background / --live --quit:
    libvirt's state is true after each; `vmsnap restore FILE` brings the domain back through
    libvirt (the first on 2 multifd channels), RAM checked each time. Multifd channels meet
    QEMU in a directory of its user in its root, also as libvirt-qemu in libvirt's mount
    namespace. The live save runs under the converger. A background save needs
    userfaultfd, which QEMU as libvirt-qemu (Debian's default) lacks here: one line naming
    it, the domain runs on."""
    name = f"lvsave-{os.getpid()}"
    guest, vm = booted_vm(daemon, name)
    work = vm.workdir
    try:
        paused = work / "paused.vms"
        saved = {}  # snapshot: what it holds
        with guest.saving(vm) as saved[paused]:
            run = vmsnap_domain(daemon, "save", "--domain", name, paused, "--channels", "2",
                                "--json")
        assert events(run)["start"]["channels"] == 2
        assert vm.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        vm.cont()  # libvirt can resume it: the guest goes on
        guest.wait_alive(vm)

        checkpoint = work / "checkpoint.vms"
        with guest.saving(vm) as saved[checkpoint]:
            vmsnap_domain(daemon, "save", "--domain", name, checkpoint, "--resume")
        assert vm.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        guest.wait_alive(vm)

        point = work / "background.vms"  # the guest runs on; libvirt says so
        args = ("save", "--connect", daemon.uri, "--domain", name, point, "--background")
        if daemon.config == "debian":  # QEMU as libvirt-qemu: no userfaultfd here
            r = subprocess.run([VMSNAP, *map(str, args)], capture_output=True, text=True,
                               timeout=600)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 1 and len(lines) == 1 and "userfaultfd" in lines[0], r.stderr
            assert not point.exists()
        else:
            with guest.saving(vm, background=True) as saved[point]:
                vmsnap(*args)
        assert vm.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        guest.wait_alive(vm)

        live = work / "live.vms"
        with guest.saving(vm) as saved[live]:
            run = vmsnap_domain(daemon, "save", "--domain", name, live, "--live", "--quit",
                                "--json")
        done = events(run)["done"]
        assert done["mode"] == "live" and done["throttle_pct"] is not None, done  # converger
        assert vm.state()[0] == libvirt.VIR_DOMAIN_NOSTATE  # transient: ended means gone
        for snap in (paused, checkpoint, live, *([point] if point.exists() else [])):
            multifd = ("--channels", "2", "--json", "-v") if snap == paused else ()
            run = vmsnap_domain(daemon, "restore", snap, "--paused", *multifd)
            if multifd:  # libvirt starts it waiting, vmsnap loads it on 2 channels that
                assert events(run)["start"]["channels"] == 2  # QEMU 7.2 accepts on our
                assert "migrate-incoming tcp:fd:" in run.stderr  # socket, passed by fd
            assert vm.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            guest.check_restored(vm, saved[snap])
            vm.destroy()
    finally:
        vm.destroy()


def test_lazy_restore_of_domain_file(daemon):
    """`vmsnap restore FILE --lazy` of a domain file: libvirt starts the domain waiting for
    an incoming stream (-incoming defer in its qemu namespace), vmsnap is the postcopy source
    over libvirt's monitor (the stream by fd), the guest runs before its RAM is in; RAM
    checked. The persistent definition never gets -incoming, nor does a later save. QEMU as
    libvirt-qemu (Debian's default) has no userfaultfd here: one line, domain shut off."""
    name = f"lvlazy-{os.getpid()}"
    guest, vm = booted_vm(daemon, name, persistent=True)
    try:
        snap = vm.workdir / "vm.vms"
        with guest.saving(vm) as saved:
            vmsnap_domain(daemon, "save", "--domain", name, snap, "--quit")
        args = [VMSNAP, "restore", "--connect", daemon.uri, str(snap), "--lazy", "--json"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if daemon.config == "debian":
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            assert "userfaultfd" in lines[0], proc.stderr
            wait_shut_off(vm)
            return
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout.strip().splitlines()[-1])
        assert done["event"] == "done" and done["engine"] == "postcopy", done
        assert done["running_seconds"] < done["seconds"], done
        assert vm.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        guest.check_restored(vm, saved, resumed=True)  # the point of --lazy: it runs
        assert "-incoming" not in vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

        again = vm.workdir / "again.vms"  # saved again: restores eagerly through libvirt
        with guest.saving(vm) as saved:
            vmsnap_domain(daemon, "save", "--domain", name, again, "--quit")
        with vmsnap_open(again) as s:
            assert "-incoming" not in s.metadata.extra["libvirt"]["xml"]
        vmsnap_domain(daemon, "restore", "--paused", again)
        guest.check_restored(vm, saved)
    finally:
        vm.destroy()


@pytest.mark.parametrize("daemon", ["root"], indirect=True)
def test_domain_restore_of_bad_page_leaves_it_shut_off(daemon):
    """A page failing its checksum in a multifd or lazy restore into a domain libvirt
    started waiting: one line naming the page, and libvirt ends the domain (shut off, not
    running on bad RAM), as vmsnap ends a QEMU it launched."""
    name = f"lvbad-{os.getpid()}"
    guest, vm = booted_vm(daemon, name, persistent=True)
    try:
        snap = vm.workdir / "vm.vms"
        vmsnap_domain(daemon, "save", "--domain", name, snap, "--quit")
        page = flip_page_bit(snap)
        for how in (("--channels", "2"), ("--lazy",)):
            proc = subprocess.run([VMSNAP, "restore", "--connect", daemon.uri, str(snap), *how],
                                  capture_output=True, text=True, timeout=600)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, (how, proc.stderr)
            assert "pc.ram" in lines[0] and f"{page * 4096:#x}" in lines[0], lines[0]
            assert vm.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, (how, vm.state())
    finally:
        vm.destroy()


def kill_mid_stream(argv: list[str], after_bytes: int = 32 << 20) -> None:
    """Run `argv` and SIGKILL it once it has written `after_bytes`."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            io = Path(f"/proc/{proc.pid}/io").read_text()
            if int(io.split("wchar: ")[1].split()[0]) > after_bytes:
                proc.kill()
                break
            time.sleep(0.005)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"


@pytest.mark.parametrize("daemon", ["debian"], indirect=True)
def test_writer_killed_mid_stream_never_cold_boots(daemon):
    """A vmsnap killed while it feeds libvirt: `vmsnap restore` of a persistent domain and
    `virsh start` from a managed-save FIFO both fail; the domain stays shut off, not booted
    afresh; a second try restores it."""
    name = f"lvkill-{os.getpid()}"
    managed = daemon.path(f"/var/lib/libvirt/qemu/save/{name}.save")
    guest, vm = booted_vm(daemon, name, persistent=True)
    try:
        snap = vm.workdir / "vm.vms"
        with guest.saving(vm) as saved:
            vmsnap_domain(daemon, "save", "--domain", name, snap, "--quit")
        assert vm.state() == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
        kill_mid_stream([VMSNAP, "restore", "--connect", daemon.uri, str(snap)])
        wait_shut_off(vm)

        os.mkfifo(managed, 0o600)
        start = Call(vm.dom.create)  # virsh start: reads the managed-save FIFO
        kill_mid_stream([VMSNAP, "export", "--libvirt", str(snap), str(managed)])
        with pytest.raises(libvirt.libvirtError):
            start.join()
        wait_shut_off(vm)

        vmsnap_domain(daemon, "restore", "--paused", snap)
        guest.check_restored(vm, saved)
    finally:
        vm.destroy()
        Path(managed).unlink(missing_ok=True)


def wait_shut_off(vm, timeout: float = 30.0) -> None:
    """The domain ends shut off, never running on the way, and stays so: libvirt did not
    boot it instead. A restore whose writer died keeps it paused until its QEMU has seen the
    stream end and libvirt has torn it down: over a second on a busy host (CI, once)."""
    deadline = time.monotonic() + timeout
    while (state := vm.state())[0] != libvirt.VIR_DOMAIN_SHUTOFF:
        assert state[0] != libvirt.VIR_DOMAIN_RUNNING, f"the domain runs: {state}"
        assert time.monotonic() < deadline, f"the domain is not shut off: {state}"
        time.sleep(0.05)
    time.sleep(1)
    assert vm.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, vm.state()


@pytest.mark.parametrize("daemon", ["root"], indirect=True)
def test_domain_errors_are_one_line(daemon, tmp_path):
    snap = tmp_path / "x.vms"
    for args, message in [
        (("save", "--domain", "no-such-domain", snap), "libvirt domain 'no-such-domain'"),
        (("save", "--domain", "d", snap, "--downtime-limit", "9"), "is for --live saves"),
        (("restore", snap, "--domain", "a", "--xml", "b"), "either --domain or --xml"),
    ]:
        proc = subprocess.run([VMSNAP, *map(str, args[:1]), "--connect", daemon.uri,
                               *map(str, args[1:])], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not snap.exists()
