"""A libvirt domain started to wait for a stream that vmsnap feeds it over libvirt's own
monitor: libvirt's restore API reads one stream and has no return path (no postcopy), so for a
lazy restore the domain's XML gets `-incoming defer` in libvirt's qemu namespace
(<qemu:commandline>) and libvirt starts it paused, with its security labels, namespaces and
cgroups as for any start; vmsnap then hands QEMU its stream by fd (getfd through
qemu-monitor-command), never by a path QEMU would have to reach.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from ..errors import VmsnapError
from ..orchestration import qmp as qmpmod
from . import domain as dommod

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_COMMANDLINE, _ARG = f"{{{QEMU_NS}}}commandline", f"{{{QEMU_NS}}}arg"
INCOMING = ("-incoming", "defer")
ElementTree.register_namespace("qemu", QEMU_NS)


def _parse(xml: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise VmsnapError(f"the domain XML does not parse: {err}") from err


def _strip(root: ElementTree.Element) -> None:
    """Drop every `-incoming defer` pair from <qemu:commandline> (and the element, if
    nothing else is left in it)."""
    for cmdline in root.findall(_COMMANDLINE):
        args = cmdline.findall(_ARG)
        for first, second in zip(args, args[1:], strict=False):
            if (first.get("value"), second.get("value")) == INCOMING and first in cmdline:
                cmdline.remove(first)
                cmdline.remove(second)
        if not len(cmdline):
            root.remove(cmdline)


def with_incoming(xml: str) -> str:
    """`xml` whose QEMU waits for an incoming stream (`-incoming defer`)."""
    root = _parse(xml)
    _strip(root)
    cmdline = ElementTree.SubElement(root, _COMMANDLINE)
    for value in INCOMING:
        ElementTree.SubElement(cmdline, _ARG, value=value)
    return ElementTree.tostring(root, encoding="unicode")


def without_incoming(xml: str) -> str:
    """`xml` without the `-incoming defer` with_incoming added (a domain restored lazily
    and saved again must boot normally from its saved XML)."""
    root = _parse(xml)
    if root.find(_COMMANDLINE) is None:
        return xml
    _strip(root)
    return ElementTree.tostring(root, encoding="unicode")


@dataclass
class IncomingDomain:
    """A domain libvirt started paused, its QEMU waiting for an incoming stream; `kill`
    (destroy) and `release` match a QEMU vmsnap launched (lazy restore's target)."""

    dom: Any
    monitor: dommod.DomainMonitor
    peer: qmpmod.Peer
    label: str

    @property
    def pid(self) -> int | None:
        return self.peer.pid

    def kill(self) -> None:
        with contextlib.suppress(Exception):  # gone already
            self.dom.destroy()

    def release(self) -> None:
        """The guest no longer needs vmsnap: libvirt keeps the domain."""


async def start_incoming(conn: Any, xml: str) -> IncomingDomain:
    """Start `xml` through libvirt, paused, its QEMU waiting for an incoming stream; a
    defined domain of the same name and UUID runs it as its live definition."""
    import libvirt

    name = dommod.name_in(xml)
    try:
        dom = await asyncio.get_running_loop().run_in_executor(
            None, conn.createXML, with_incoming(xml), libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as err:
        raise VmsnapError(f"libvirt could not start domain {name!r} for the restore: "
                          f"{dommod.message(err)}") from err
    mon = dommod.DomainMonitor(dom)
    try:
        peer = await dommod.describe(mon, name)
    except BaseException:
        with contextlib.suppress(Exception):
            dom.destroy()
        raise
    return IncomingDomain(dom, mon, peer, f"libvirt domain {name}")
