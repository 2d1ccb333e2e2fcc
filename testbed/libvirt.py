"""libvirt in the test bed: a private libvirtd, and transient domains running the bootguest.

`Libvirtd` starts libvirtd + virtlogd in their own mount namespace (testbed.libvirt_ns), with
/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt bound
from one private directory, so a test picks QEMU's user and namespaces in qemu.conf without
touching the host's libvirt, and clients reach it by `qemu:///system?socket=...`.

`LibvirtVm` is a domain that quacks like testbed.qemu.Vm for the bootguest helpers
(cmd/status/stop/cont/pmemsave/serial/workdir/name): the serial console is a log file and
QMP goes through libvirt's qemu-monitor-command, so the testbed's RAM check runs unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt
import libvirt_qemu

from testbed.guests import QBOOT
from testbed.paths import BOOTGUEST_DIR
from testbed.qemu import QemuError

#: qemu.conf of each configuration the tests run; "debian" is the packaged default
#: (QEMU as libvirt-qemu, dynamic_ownership=1, namespaces=["mount"]).
CONFIGS = {
    "root": 'user = "root"\ngroup = "root"\nnamespaces = []\n',
    "root-mountns": 'user = "root"\ngroup = "root"\nnamespaces = [ "mount" ]\n',
    "debian": "",
}
#: The host directories each daemon gets its own copy of (mode as Debian installs them).
PRIVATE_DIRS = {"/etc/libvirt": 0o755, "/run/libvirt": 0o755, "/var/lib/libvirt": 0o755,
                "/var/cache/libvirt": 0o755, "/var/log/libvirt": 0o700}
#: Shared by every private daemon: libvirt's cache of QEMU's capabilities (it checks the cache
#: against QEMU's binary itself), so only the first start probes QEMU (~20 s here).
CACHE = Path("/var/tmp/vmsnap-libvirt-cache")


class LibvirtUnavailable(RuntimeError):
    pass


class Libvirtd:
    """A private libvirtd (+ virtlogd) with the qemu.conf of `config`, under `root`
    (0711: QEMU as libvirt-qemu must reach the guest files and dumps below it)."""

    def __init__(self, root: Path, config: str = "debian"):
        self.root = root
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.uri = f"qemu:///system?socket={root / 'run/libvirt/libvirt-sock'}"
        self.version = ""
        self.conn: libvirt.virConnect | None = None

    def path(self, host_path: str) -> Path:
        """Where a path the daemon sees (under PRIVATE_DIRS) lives on the host."""
        return self.root / host_path.lstrip("/")

    def start(self) -> Libvirtd:
        for tool in ("/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "unshare"):
            if shutil.which(tool) is None:
                raise LibvirtUnavailable(f"{tool} not installed (scripts/install.sh)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        CACHE.mkdir(mode=0o755, exist_ok=True)
        for host, mode in PRIVATE_DIRS.items():
            private = self.path(host)
            if host == "/etc/libvirt":
                shutil.copytree(host, private, dirs_exist_ok=True)
            if host == "/var/cache/libvirt":
                private.parent.mkdir(parents=True, exist_ok=True)
                private.symlink_to(CACHE)
                continue
            private.mkdir(parents=True, exist_ok=True)
            private.chmod(mode)
        if CONFIGS[self.config]:
            (self.path("/etc/libvirt") / "qemu.conf").write_text(CONFIGS[self.config])
        log = open(self.root / "libvirtd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
             "testbed.libvirt_ns", str(self.root), *PRIVATE_DIRS],
            stdout=log, stderr=log, start_new_session=True, cwd=Path(__file__).parent.parent)
        log.close()
        try:
            self.version = self._wait_ready(time.monotonic() + 300)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self, deadline: float) -> str:
        """Wait until the daemon answers and knows KVM (its first start probes QEMU)."""
        assert self.proc is not None
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors as exceptions only
        while True:
            try:
                self.conn = libvirt.open(self.uri)
                caps = self.conn.getCapabilities()
                break
            except libvirt.libvirtError as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise LibvirtUnavailable(f"libvirtd does not answer: {err}; log: "
                                             f"{self.root / 'libvirtd.log'}") from err
                time.sleep(0.2)
        if "<domain type='kvm'" not in caps:
            raise LibvirtUnavailable("libvirt reports no KVM domain type")
        v = self.conn.getVersion()
        return f"libvirt {libvirt.getVersion() // 1000000}.{libvirt.getVersion() // 1000 % 1000}" \
               f", QEMU {v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def close(self) -> None:
        """Destroy every domain this daemon runs, then stop it and its virtlogd."""
        if self.proc is None:
            return
        if self.conn is not None:
            for dom in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
            self.conn.close()
            self.conn = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # virtlogd removes its pidfile as it ends: no exists() check to race that
            os.kill(int((self.root / "virtlogd.pid").read_text().split()[0]), signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass
        self.proc = None

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def private_root(prefix: str = "vmsnap-libvirt-") -> Path:
    """A fresh directory libvirt-qemu can traverse (pytest's tmp dirs are 0700 all the way)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    root.chmod(0o711)
    return root


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


def domain_xml(name: str, memory_mb: int, cmdline: str, serial: Path, kernel: Path) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader type='rom'>{QBOOT}</loader>
    <kernel>{kernel}</kernel>
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
</domain>
"""


class LibvirtVm:
    """A libvirt domain running the bootguest; `workdir` is where QEMU (possibly as
    libvirt-qemu) writes its serial log and RAM dumps. Driven through libvirt-python (virsh
    spends ~5 s closing each connection to a private daemon here)."""

    def __init__(self, conn: libvirt.virConnect, name: str, workdir: Path, memory_mb: int,
                 cmdline: str):
        self.conn = conn
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            user = pwd.getpwnam("libvirt-qemu")
            os.chown(workdir, user.pw_uid, user.pw_gid)
        except KeyError:
            os.chmod(workdir, 0o777)
        kernel = workdir / "bootguest.elf"  # in QEMU's reach whatever the checkout's modes
        shutil.copyfile(BOOTGUEST_DIR / "bootguest.elf", kernel)
        self.serial_path = workdir / f"{name}.serial.log"
        self.xml = domain_xml(name, memory_mb, cmdline, self.serial_path, kernel)
        self.serial = FileSerial(self.serial_path)

    @property
    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def create(self) -> LibvirtVm:
        """Start the domain paused (transient)."""
        self.conn.createXML(self.xml, libvirt.VIR_DOMAIN_START_PAUSED)
        return self

    def define(self) -> LibvirtVm:
        """Define the domain (persistent) and start it paused."""
        self.conn.defineXML(self.xml).createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        return self

    def state(self) -> tuple[int, int]:
        """(state, reason), e.g. (VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_SAVED)."""
        try:
            return tuple(self.dom.state())
        except libvirt.libvirtError:
            return (libvirt.VIR_DOMAIN_NOSTATE, 0)  # transient and gone

    def cmd(self, name: str, **args: Any) -> Any:
        """A QMP command through libvirt; QemuError (as Vm.cmd) also if the domain is gone."""
        msg = {"execute": name, **({"arguments": args} if args else {})}
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(msg), 0))
        except libvirt.libvirtError as err:
            raise QemuError(f"QMP {name}: {err}") from err
        if "error" in reply:
            raise QemuError(f"QMP {name}: {reply['error']}")
        return reply["return"]

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def stop(self) -> None:
        self.dom.suspend()

    def cont(self) -> None:
        self.dom.resume()

    def pmemsave(self, address: int, size: int, path: Path) -> Path:
        self.cmd("pmemsave", val=address, size=size, filename=str(path))
        return path

    def destroy(self) -> None:
        """Stop the domain and forget it (definition and managed save image too)."""
        try:
            dom = self.dom
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
