"""The libvirt side of a domain, through libvirt-python: connect, look the domain up, read
its migratable XML, and talk to its QEMU over libvirt's own monitor (qemu-monitor-command),
passing file descriptors with it — so no extra monitor socket and nothing in QEMU's
user, namespace or security label has to reach a path of vmsnap's."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree

from ..errors import VmsnapError, squash
from ..orchestration.qmp import Peer, QmpCommandError

try:
    import libvirt
    import libvirt_qemu
except ImportError:  # reported when a libvirt verb is used
    libvirt = libvirt_qemu = None

DEFAULT_URI = "qemu:///system"


def _require() -> None:
    if libvirt is None:
        raise VmsnapError("libvirt-python is not installed (pip install 'vmsnap[libvirt]' "
                          "or apt-get install python3-libvirt)")


def message(err: Exception) -> str:
    text = err.get_error_message() if hasattr(err, "get_error_message") else str(err)
    return squash(str(text))


def name_in(xml: str) -> str:
    """The <name> of a domain XML ("?" if it has none or does not parse)."""
    try:
        return ElementTree.fromstring(xml).findtext("name") or "?"
    except ElementTree.ParseError:
        return "?"


def connect(uri: str | None) -> Any:
    """A libvirt connection (default qemu:///system), or a one-line VmsnapError."""
    _require()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions
    try:
        return libvirt.open(uri or DEFAULT_URI)
    except libvirt.libvirtError as err:
        raise VmsnapError(f"cannot connect to libvirt at {uri or DEFAULT_URI}: "
                          f"{message(err)}") from err


def lookup(conn: Any, name: str) -> Any:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        raise VmsnapError(f"libvirt domain {name!r}: {message(err)}") from err


def migratable_xml(dom: Any) -> str:
    """The XML a restore needs (with <uuid>, without what the running QEMU added)."""
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE))


def is_running(dom: Any) -> bool:
    return bool(dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING)


class DomainMonitor:
    """QMP commands through libvirt's monitor, with QMPClient's `execute` signature (so the
    QMP orchestration runs unchanged); libvirt's calls block, so they run in a thread."""

    def __init__(self, dom: Any):
        self.dom = dom

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None, *,
                      timeout: float | None = None) -> Any:
        """`cmd` over libvirt's monitor (libvirt times a stuck QEMU out itself)."""
        return await self.execute_with_fds(cmd, arguments, [])

    async def execute_with_fds(self, cmd: str, arguments: Mapping[str, object] | None,
                               fds: list[int]) -> Any:
        """Run `cmd`, handing QEMU `fds` with it (SCM_RIGHTS through libvirt)."""
        msg = json.dumps({"execute": cmd, **({"arguments": dict(arguments)} if arguments else {})})
        loop = asyncio.get_running_loop()
        try:
            if fds:
                out, _ = await loop.run_in_executor(
                    None, libvirt_qemu.qemuMonitorCommandWithFiles, self.dom, msg, fds, 0)
            else:
                out = await loop.run_in_executor(
                    None, libvirt_qemu.qemuMonitorCommand, self.dom, msg, 0)
        except libvirt.libvirtError as err:
            raise VmsnapError(f"libvirt monitor, {cmd}: {message(err)}") from err
        reply = json.loads(out)
        if "error" in reply:
            error = reply["error"]
            raise QmpCommandError(cmd, str(error.get("class", "")),
                                  str(error.get("desc", error)))
        return reply.get("return")

    async def call(self, fn: Any, *args: Any) -> Any:
        """A blocking libvirt call (suspend, resume, destroy) in a thread, errors in one line."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except libvirt.libvirtError as err:
            raise VmsnapError(f"libvirt: {message(err)}") from err


def qemu_pid(vcpus: list[dict[str, Any]], name: str) -> int | None:
    """QEMU's pid behind libvirt, from its vCPU threads (query-cpus-fast thread-id) and
    checked to be the emulator of domain `name`; None if it is not visible from here
    (another pid namespace or host)."""
    for vcpu in vcpus:
        tid = vcpu.get("thread-id")
        if not isinstance(tid, int) or tid <= 0:
            continue
        try:
            with open(f"/proc/{tid}/status") as f:
                tgid = int(next(line for line in f if line.startswith("Tgid:")).split()[1])
            with open(f"/proc/{tgid}/cmdline", "rb") as f:
                argv = f.read(1 << 20).split(b"\0")
        except (OSError, StopIteration, ValueError, IndexError):
            return None
        if os.path.basename(argv[0]).startswith(b"qemu-system-") and any(
                a.startswith(b"guest=" + name.encode() + b",") or a == b"guest=" + name.encode()
                for a in argv):
            return tgid
        return None
    return None


async def describe(mon: DomainMonitor, name: str) -> Peer:
    """The QEMU behind domain `name`, as the QMP orchestration sees a peer (no command line:
    libvirt, not vmsnap, starts this QEMU)."""
    q = (await mon.execute("query-version"))["qemu"]
    status = await mon.execute("query-status")
    pid = qemu_pid(await mon.execute("query-cpus-fast"), name)
    return Peer((q["major"], q["minor"], q["micro"]), bool(status["running"]),
                str(status["status"]), pid, None)
