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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed.paths import BOOTGUEST_DIR, LINUXGUEST_DIR
from testbed.qemu import Vm, VmConfig, kvm_available
from testbed.ramcheck import RamCheckResult, check_counter_ranges

#: qboot boots in ~0.1 s where SeaBIOS takes ~3 s under this host's nested KVM.
QBOOT = "/usr/share/qemu/qboot.rom"


class GuestCheckFailed(AssertionError):
    pass


def default_accel(linux: bool) -> str:
    """KVM where it can run the guest; the Linux guest uses TCG unless told otherwise
    (this host's nested KVM cannot run a stock kernel: set VMSNAP_LINUX_ACCEL=kvm elsewhere)."""
    if linux:
        return os.environ.get("VMSNAP_LINUX_ACCEL", "tcg")
    return os.environ.get("VMSNAP_BOOT_ACCEL", "kvm" if kvm_available() else "tcg")


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

    def check(self, vm: Vm) -> RamCheckResult:
        """Stop the guest, read all stamped RAM (a piece at a time: the checking process
        stays small whatever the guest's size), apply the one-moving-edge rule."""
        vm.stop()
        path = vm.workdir / f"{vm.name}.pmemsave"  # not .ram: tests back RAM by such files

        def read(start: int, length: int, _range_start: int) -> np.ndarray:
            vm.pmemsave(start, length, path)
            try:
                return np.fromfile(path, dtype=np.uint8)
            finally:
                path.unlink()

        result = check_counter_ranges(self.ranges, read, self.mode, workset=self.workset)
        if not result.ok:
            raise GuestCheckFailed(f"bootguest RAM check failed: {result.describe()}")
        return result

    def check_restored(self, vm: Vm) -> RamCheckResult:
        """After a restore: let the guest run until it proves alive, then check its RAM."""
        if vm.status() != "running":
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
        mark = vm.serial.mark()
        vm.serial.send_line("PING")
        vm.serial.wait_for("PONG", timeout, start=mark)

    def check(self, vm: Vm, timeout: float = 600.0) -> str:
        """Ask the guest to check every page it filled; returns the guest's OK line."""
        if vm.status() != "running":
            vm.cont()
        mark = vm.serial.mark()
        vm.serial.send_line("VERIFY")
        m = vm.serial.wait_for(r"VERIFY (OK|FAIL)[^\r\n]*(?=[\r\n])", timeout, start=mark)
        if m.group(1) != "OK":
            raise GuestCheckFailed(f"linuxguest: {m.group(0)}")
        return m.group(0)

    def check_restored(self, vm: Vm) -> str:
        if vm.status() != "running":
            vm.cont()
        self.wait_alive(vm)
        return self.check(vm)


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
