"""The `virsh save/restore --bypass-cache` peer: a private libvirtd (started here when none
answers), a transient domain running the same bootguest (qboot + multiboot kernel, KVM,
host-passthrough minus arch-capabilities), its serial console read from a log file, and QMP
through `virsh qemu-monitor-command` so the testbed's RAM check runs unchanged on it."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from testbed.guests import QBOOT
from testbed.paths import BOOTGUEST_DIR

URI = "qemu:///system"
PIDFILES = {"virtlogd": Path("/run/vmsnap-bench-virtlogd.pid"),
            "libvirtd": Path("/run/vmsnap-bench-libvirtd.pid")}


class LibvirtUnavailable(RuntimeError):
    pass


def virsh(*args: str, timeout: float = 1800.0, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args[:2])}: {proc.stderr.strip()}")
    return proc


class Daemon:
    """libvirtd + virtlogd: reuse running ones, else start them and stop them in close()."""

    def __init__(self) -> None:
        self.started: list[int] = []

    def ensure(self) -> str:
        for tool in ("virsh", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd"):
            if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
                raise LibvirtUnavailable(f"{tool} not installed (scripts/install.sh --bench)")
        if not Path("/run/libvirt/virtlogd-sock").exists():
            self._start("virtlogd")
        if virsh("version", timeout=20, check=False).returncode != 0:
            self._start("libvirtd")
        deadline = time.monotonic() + 30
        while (proc := virsh("version", timeout=20, check=False)).returncode != 0:
            if time.monotonic() > deadline:
                raise LibvirtUnavailable(f"libvirtd does not answer: {proc.stderr.strip()}")
            time.sleep(0.3)
        caps = virsh("capabilities", timeout=30).stdout
        if "<domain type='kvm'" not in caps:
            raise LibvirtUnavailable("libvirt reports no KVM domain type")
        return proc.stdout.strip().splitlines()[-1]

    def _start(self, name: str) -> None:
        pidfile = PIDFILES[name]
        pidfile.unlink(missing_ok=True)
        subprocess.run([f"/usr/sbin/{name}", "-d", "-p", str(pidfile)], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            if time.monotonic() > deadline:
                raise LibvirtUnavailable(f"{name} did not start")
            time.sleep(0.05)
        self.started.append(int(pidfile.read_text().split()[0]))

    def close(self) -> None:
        for pid in reversed(self.started):  # only the daemons this process started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.started.clear()


class FileSerial:
    """The guest's serial log file, with SerialConsole's mark()/wait_for(); libvirt truncates
    the file when it restores a domain, which counts as new output here."""

    def __init__(self, path: Path):
        self.path = path
        self._before = ""
        self._last = ""

    @property
    def text(self) -> str:
        try:
            now = self.path.read_text(encoding="latin-1")
        except FileNotFoundError:
            now = ""
        if len(now) < len(self._last):
            self._before += self._last
        self._last = now
        return self._before + now

    def mark(self) -> int:
        return len(self.text)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, start)
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"serial log: {pattern!r} not seen in {timeout:.0f}s; "
                                   f"last: {self.text[-200:]!r}")
            time.sleep(0.05)

    def close(self) -> None:
        pass


def domain_xml(name: str, memory_mb: int, cmdline: str, serial: Path) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader type='rom'>{QBOOT}</loader>
    <kernel>{BOOTGUEST_DIR / 'bootguest.elf'}</kernel>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <cpu mode='host-passthrough'><feature policy='disable' name='arch-capabilities'/></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='none' model='none'/>
</domain>
"""


class LibvirtVm:
    """A transient libvirt domain that quacks like testbed.qemu.Vm for the bootguest helpers
    (cmd/status/stop/cont/pmemsave/serial/workdir/name)."""

    def __init__(self, name: str, workdir: Path, memory_mb: int, cmdline: str):
        self.name = name
        self.workdir = workdir  # QEMU runs as libvirt-qemu: pmemsave files land here
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            user = pwd.getpwnam("libvirt-qemu")
            os.chown(workdir, user.pw_uid, user.pw_gid)
        except KeyError:
            os.chmod(workdir, 0o777)
        self.serial_path = workdir / f"{name}.serial.log"
        self.xml_path = workdir / f"{name}.xml"
        self.xml_path.write_text(domain_xml(name, memory_mb, cmdline, self.serial_path))
        self.serial = FileSerial(self.serial_path)

    def create(self) -> LibvirtVm:
        virsh("destroy", self.name, check=False, timeout=60)
        virsh("create", str(self.xml_path), "--paused", timeout=120)
        return self

    def cmd(self, name: str, **args: Any) -> Any:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        out = virsh("qemu-monitor-command", self.name, json.dumps(msg), timeout=600).stdout
        reply = json.loads(out)
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply["return"]

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def stop(self) -> None:
        virsh("suspend", self.name)

    def cont(self) -> None:
        virsh("resume", self.name)

    def pmemsave(self, address: int, size: int, path: Path) -> Path:
        self.cmd("pmemsave", val=address, size=size, filename=str(path))
        return path

    def destroy(self) -> None:
        virsh("destroy", self.name, check=False, timeout=60)
