"""The two test guests, each knowing how to boot, prove it is alive, and check its RAM.

- BootGuest: our own multiboot kernel; stamps a counter into every page and keeps
  incrementing them in order. The host reads RAM with QMP `pmemsave` and applies the
  "one moving edge" rule (testbed.ramcheck). Runs under KVM here.
- LinuxGuest: Debian's kernel + busybox + memfill; the guest checks its own pages on a
  `VERIFY` line and answers `VERIFY OK <pages>` or `VERIFY FAIL <page>`. TCG here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed.paths import BOOTGUEST_DIR, LINUXGUEST_DIR
from testbed.qemu import QemuError, Vm, VmConfig, kvm_available
from testbed.ramcheck import RamCheckResult, check_counter_ranges, compare_with_saved
from testbed.serial import SerialConsole

#: qboot boots in ~0.1 s where SeaBIOS takes ~3 s under this host's nested KVM.
QBOOT = "/usr/share/qemu/qboot.rom"


class GuestCheckFailed(AssertionError):
    pass


@dataclass
class Saved:
    """What a guest held when it was saved: the reference `check_restored` compares a
    restore with. Made only by `guest.saving(vm)` around the save.

    `at_least`: bootguest, no page's counter was below it when the save began (the first
    page's counter read just before, minus one: the pages behind the moving edge); Linux
    guest, memfill's rewrite count then. `exact`: bootguest, the RAM the file must hold,
    read from the source still paused after a paused or live save (or paused before it)."""

    at_least: int
    exact: RamCheckResult | None = None
    complete: bool = False  # the save's `with` block ended


def default_accel(linux: bool) -> str:
    """KVM where it can run the guest; the Linux guest uses TCG unless told otherwise
    (this host's nested KVM cannot run a stock kernel: set VMSNAP_LINUX_ACCEL=kvm elsewhere)."""
    if linux:
        return os.environ.get("VMSNAP_LINUX_ACCEL", "tcg")
    return os.environ.get("VMSNAP_BOOT_ACCEL", "kvm" if kvm_available() else "tcg")


def _answers(vm: Vm) -> bool:
    try:
        vm.status()
    except QemuError:
        return False
    return True


def _expect_restored(vm: Vm, saved: Saved, resumed: bool) -> None:
    """check_restored's preconditions: a finished `saving` block, and the restored VM
    paused (running only where the caller says its restore path resumes it)."""
    if not saved.complete:
        raise GuestCheckFailed("check_restored: the save's `saving` block has not ended")
    status = vm.status()
    if (status == "running") != resumed:
        raise GuestCheckFailed(f"check_restored(resumed={resumed}) but the restored VM is "
                               f"{status!r}")


@dataclass
class BootGuest:
    mode: str = "counter"  # or "random": pages full of a per-page pseudo-random pattern
    memory_mb: int = 256
    limit_mb: int | None = None
    accel: str | None = None
    ws_mb: int | None = None  # after READY, sweep only this many MiB of scattered pages
    ranges: list[tuple[int, int]] = field(default_factory=list)
    workset: tuple[int, int] | None = None  # (stride, count) the guest printed

    kind = "bootguest"

    def config(self, qemu: str, workdir: Path, machine: str = "q35") -> VmConfig:
        accel = self.accel or default_accel(linux=False)
        cpu = "host,-arch-capabilities" if accel == "kvm" else "qemu64"
        append = (f"mode={self.mode}" + (f" limit_mb={self.limit_mb}" if self.limit_mb else "")
                  + (f" ws_mb={self.ws_mb}" if self.ws_mb else ""))
        return VmConfig(qemu=qemu, accel=accel, cpu=cpu, machine=machine,
                        memory_mb=self.memory_mb, binds=[BOOTGUEST_DIR],
                        args=["-bios", QBOOT, "-kernel", str(BOOTGUEST_DIR / "bootguest.elf"),
                              "-append", append])

    def boot(self, vm: Vm, timeout: float = 300.0) -> None:
        """Start the guest and wait until every page carries its first stamp."""
        vm.cont()
        text = vm.serial.wait_for(r"READY", timeout).string
        self.ranges = [(int(a, 16), int(b, 16))
                       for a, b in re.findall(r"RANGE ([0-9a-f]{16}) ([0-9a-f]{16})", text)]
        if not self.ranges:
            raise GuestCheckFailed(f"bootguest printed no RANGE lines: {text[-200:]!r}")
        ws = re.search(r"WORKSET ([0-9a-f]{16}) ([0-9a-f]{16})", text)
        self.workset = (int(ws.group(1), 16), int(ws.group(2), 16)) if ws else None
        if bool(ws) != bool(self.ws_mb):
            raise GuestCheckFailed(f"bootguest ws_mb={self.ws_mb} but WORKSET line {ws}")

    def wait_alive(self, vm: Vm, timeout: float = 120.0) -> None:
        """Wait for a fresh heartbeat: the guest is running and stamping."""
        mark = vm.serial.mark()
        vm.serial.wait_for("B", timeout, start=mark)

    def counter(self, vm: Vm) -> int:
        """The first page's stamp, read while the guest runs: how many sweeps it has made."""
        path = vm.workdir / f"{vm.name}.counter"
        vm.pmemsave(self.ranges[0][0], 8, path)
        value = int.from_bytes(path.read_bytes(), "little")
        path.unlink()
        return value

    def read(self, vm: Vm, *, rest: bool = True) -> RamCheckResult:
        """Read all stamped RAM of the stopped guest (a piece at a time: the checking process
        stays small whatever the guest's size) and apply the one-moving-edge rule; `rest`:
        also bytes 8..4095 of every page (the guest writes them on its first pass only, so
        a check after the guest ran still sees them as restored)."""
        path = vm.workdir / f"{vm.name}.pmemsave"  # not .ram: tests back RAM by such files

        def read(start: int, length: int, _range_start: int) -> np.ndarray:
            vm.pmemsave(start, length, path)
            try:
                return np.fromfile(path, dtype=np.uint8)
            finally:
                path.unlink(missing_ok=True)  # none if QEMU failed (e.g. ended by a save)

        return check_counter_ranges(self.ranges, read, self.mode, workset=self.workset,
                                    check_rest=rest)

    def check(self, vm: Vm) -> RamCheckResult:
        """Stop the guest and check its RAM with the one-moving-edge rule."""
        vm.stop()
        result = self.read(vm)
        if not result.ok:
            raise GuestCheckFailed(f"bootguest RAM check failed: {result.describe()}")
        return result

    @contextmanager
    def saving(self, vm: Vm, *, background: bool = False) -> Iterator[Saved]:
        """Around a save of `vm`: records what the file must hold. A paused guest's RAM is
        read whole (it stands still); a running one's first counter gives the lower bound,
        and if the save leaves it paused (a paused or live save), its RAM is read then.
        `background`: the file holds RAM as the save began, not as it ended."""
        if vm.status() == "running":
            saved = Saved(at_least=self.counter(vm) - 1)
        else:
            exact = self.read(vm, rest=False)  # the counters are the reference
            saved = Saved(at_least=exact.last_counter or 0, exact=exact)
        yield saved
        if saved.exact is None and not background:
            try:
                if vm.status() != "running":
                    saved.exact = self.read(vm, rest=False)
            except QemuError:
                if _answers(vm):
                    raise
                # ended by the save (--quit): the lower bound stands
        saved.complete = True

    def check_restored(self, vm: Vm, saved: Saved, *, resumed: bool = False) -> RamCheckResult:
        """After a restore left the guest paused: its RAM must be what was saved (`exact`,
        else no counter below `at_least`) and pass the one-moving-edge rule, before the
        guest runs again (running, it would re-stamp RAM restored wrong into a valid-looking
        sequence); then let it run until it proves alive and check again.
        `resumed`: the restore path can only resume the guest (a lazy restore runs it
        while its RAM comes in): it is stopped at once and its counters must be at least
        the saved ones (stale or zeroed RAM re-stamped briefly stays below them)."""
        _expect_restored(vm, saved, resumed)
        if resumed:
            vm.stop()
        problem = compare_with_saved(self.read(vm, rest=False), saved.exact, saved.at_least,
                                     ran=resumed)  # bytes 8..4095: the check below
        if problem:
            raise GuestCheckFailed(f"bootguest RAM differs from the save: {problem}")
        vm.cont()
        self.wait_alive(vm)
        return self.check(vm)


@dataclass
class LinuxGuest:
    memory_mb: int = 512
    fill_mb: int = 256
    mode: str = "idle"  # or "dirty": keeps rewriting random pages at rate_mb_s
    rate_mb_s: int = 0
    accel: str | None = None
    pages: int = 0

    kind = "linuxguest"

    def config(self, qemu: str, workdir: Path, machine: str = "q35") -> VmConfig:
        """The disk is a private copy in `workdir`, shared by the source and the restored VM
        (never running at once, hence file.locking=off)."""
        accel = self.accel or default_accel(linux=True)
        cpu = "host" if accel == "kvm" else "qemu64"
        d = LINUXGUEST_DIR
        disk = workdir / "linuxguest-disk.img"
        if not disk.exists():
            shutil.copyfile(d / "disk.img", disk)
        return VmConfig(
            qemu=qemu, accel=accel, cpu=cpu, machine=machine, memory_mb=self.memory_mb,
            binds=[d],
            args=["-kernel", str(d / "vmlinuz"), "-initrd", str(d / "initramfs.cpio.gz"),
                  "-append", f"console=ttyS0 quiet memfill={self.fill_mb},{self.mode},"
                             f"{self.rate_mb_s}",
                  "-drive", f"file={disk},if=none,id=d0,format=raw,file.locking=off",
                  "-device", "virtio-blk-pci,drive=d0"])

    def boot(self, vm: Vm, timeout: float = 600.0) -> None:
        vm.cont()
        m = vm.serial.wait_for(r"FILLED (\d+)", timeout)
        self.pages = int(m.group(1))

    def wait_alive(self, vm: Vm, timeout: float = 120.0) -> None:
        self.ping(vm.serial, timeout)

    def check(self, vm: Vm, timeout: float = 600.0) -> str:
        """Ask the guest to check every page it filled; returns the guest's OK line."""
        if vm.status() != "running":
            vm.cont()
        return self.verify(vm.serial, timeout)

    @staticmethod
    def ping(console: SerialConsole, timeout: float = 120.0) -> None:
        """The running guest answers PING (on its console, e.g. one opened before the VM
        existed: bench/lazy_restore.py)."""
        mark = console.mark()
        console.send_line("PING")
        console.wait_for("PONG", timeout, start=mark)

    @staticmethod
    def verify(console: SerialConsole, timeout: float = 600.0) -> str:
        """memfill checks every page it filled; returns its OK line, raises on FAIL."""
        mark = console.mark()
        console.send_line("VERIFY")
        m = console.wait_for(r"VERIFY (OK|FAIL)[^\r\n]*(?=[\r\n])", timeout, start=mark)
        if m.group(1) != "OK":
            raise GuestCheckFailed(f"linuxguest: {m.group(0)}")
        return m.group(0)

    def stats(self, vm: Vm) -> dict[str, str]:
        mark = vm.serial.mark()
        vm.serial.send_line("STATS")
        line = vm.serial.wait_for(r"STATS [^\r\n]*(?=[\r\n])", 60, start=mark).group(0)
        return dict(kv.split("=", 1) for kv in line.split()[1:])

    @contextmanager
    def saving(self, vm: Vm, *, background: bool = False) -> Iterator[Saved]:
        """Around a save of `vm`: memfill's rewrite count before it (a running guest's; a
        paused one cannot answer: 0). RAM restored from an older state has fewer."""
        del background  # the count only grows: the save's start bounds every mode
        saved = Saved(at_least=int(self.stats(vm)["rewrites"])
                      if vm.status() == "running" else 0)
        yield saved
        saved.complete = True

    def check_restored(self, vm: Vm, saved: Saved, *, resumed: bool = False) -> str:
        """After a restore: let the guest run, memfill checks every page it filled, and its
        rewrite count must be at least the saved one (the guest cannot be read paused)."""
        _expect_restored(vm, saved, resumed)
        if not resumed:
            vm.cont()
        self.wait_alive(vm)
        line = self.check(vm)
        rewrites = int(self.stats(vm)["rewrites"])
        if rewrites < saved.at_least:
            raise GuestCheckFailed(f"linuxguest: {rewrites} rewrites after the restore, "
                                   f"{saved.at_least} when the save began")
        return line


def shared_ram_args(kind: str, memory_mb: int, mem_path: Path | None = None) -> list[str]:
    """QEMU options backing the guest's RAM (block `pc.ram`) with shared memory:
    kind "file" (memory-backend-file at `mem_path`) or "memfd"; "anon" adds nothing."""
    if kind == "anon":
        return []
    if kind == "file":
        obj = f"memory-backend-file,id=pc.ram,size={memory_mb}M,mem-path={mem_path},share=on"
    elif kind == "memfd":
        obj = f"memory-backend-memfd,id=pc.ram,size={memory_mb}M,share=on"
    else:
        raise ValueError(f"unknown shared RAM kind {kind!r}")
    return ["-object", obj, "-machine", "memory-backend=pc.ram"]
