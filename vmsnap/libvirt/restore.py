"""restore of a domain file: libvirt brings the domain back (its name, UUID, devices, security
labels and namespaces) with virDomainRestore, reading a private FIFO that vmsnap writes as
it reads the snapshot: libvirt's header, the domain XML, then the synthesized stream.
A lazy restore has libvirt start the domain waiting for an incoming stream instead
(libvirt.incoming) and runs vmsnap's postcopy engine over libvirt's monitor.

The FIFO is not libvirt's managed-save path, so a writer that fails or is killed mid-stream
makes the restore fail (QEMU's load fails, libvirt reports it) and never lets libvirt
cold-boot the domain in its place.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import VmsnapError
from ..fileformat.reader import Snapshot
from ..hostkey import trust_of
from ..ops.send import SendStats
from ..orchestration.lazy import restore_lazy
from ..orchestration.target import RestoreResult
from ..progress import Reporter
from . import domain as dommod
from .image import domain_of, image_head, write_image
from .incoming import IncomingDomain, start_incoming


async def restore_domain(snap: Snapshot, *, uri: str | None = None,
                         domain: str | None = None, xml: str | None = None,
                         paused: bool = False, trust_xml: bool = False,
                         reporter: Reporter | None = None, lazy: str | None = None,
                         channels: int | None = None) -> RestoreResult:
    """Restore the open snapshot `snap` through libvirt (what libvirt gets is this one open
    file, the one checked): under the XML stored in the file (if this host signed it, or
    `trust_xml`), or under defined domain `domain`'s XML, or under `xml`. By default
    libvirt's own restore reads the image vmsnap writes; `lazy` ("auto" or "postcopy"): the
    guest runs at once and its RAM follows (restore_lazy); `channels` > 0: multifd. Both
    feed a domain libvirt starts waiting for an incoming stream (incoming.start_incoming)."""
    path = snap.path
    rep = reporter or Reporter()
    image = domain_of(snap.metadata)
    trust = trust_of(snap.trailer)
    total = sum(b.present_count * b.page_size for b in snap.blocks)
    conn = dommod.connect(uri)
    try:
        if domain is not None:
            xml = dommod.migratable_xml(dommod.lookup(conn, domain))
        elif xml is None:
            if image is None:
                raise VmsnapError(f"{path} was not saved from a libvirt domain: give "
                                  "--domain NAME or --xml FILE")
            if not trust.trusted and not trust_xml:
                raise VmsnapError(f"will not define a domain from the XML stored in {path}: "
                                  f"{trust.reason}; read it with `vmsnap info`, then restore "
                                  "with --trust-command-line, or give --domain NAME or --xml FILE")
            xml = image.xml
        if lazy == "mmap":
            raise VmsnapError("a libvirt domain restores lazily by postcopy (--lazy or "
                              "--lazy=postcopy): libvirt starts its QEMU, vmsnap cannot map "
                              "the file into its RAM")
        if lazy is not None or channels:  # timed from libvirt's start of the domain
            started = time.monotonic()
            from ..orchestration.restore import restore  # eager machinery: only if used

            return await _into_incoming(conn, xml, lambda target: (
                restore_lazy(snap, engine="postcopy", target=target, paused=paused,
                             reporter=rep, started=started) if lazy is not None else
                restore(snap, target=target, channels=channels, paused=paused,
                        reporter=rep)))
        was_running = image.was_running if image else True
        return await _restore_eager(conn, snap, xml, paused or not was_running, total, rep)
    finally:
        conn.close()


async def _into_incoming(conn: Any, xml: str,
                         load: Callable[[IncomingDomain], Awaitable[RestoreResult]]
                         ) -> RestoreResult:
    """libvirt starts the domain waiting for an incoming stream, `load` brings the snapshot
    in over libvirt's monitor; a failed load never leaves the domain half restored."""
    target = await start_incoming(conn, xml)
    try:
        return await load(target)
    except BaseException:
        target.kill()
        raise


async def _restore_eager(conn: Any, snap: Snapshot, xml: str, paused: bool, total: int,
                         rep: Reporter) -> RestoreResult:
    """virDomainRestore of a private FIFO that vmsnap writes the image into."""
    workdir = tempfile.mkdtemp(prefix="vmsnap-")  # 0700: libvirtd opens the FIFO as root
    try:
        head = image_head(snap, xml=xml)
        fifo = os.path.join(workdir, "restore.img")
        os.mkfifo(fifo, 0o600)
        rep.start("restore", total)
        t0 = time.monotonic()
        stats = await _feed(conn, fifo, head, snap, paused, lambda d, t: rep.update(d, t))
        seconds = time.monotonic() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = RestoreResult(snap.path, seconds, stats.stream_bytes, stats.pages,
                           "paused" if paused else "running", None,
                           f"libvirt domain {dommod.name_in(xml)}")
    rep.done(**result.__dict__)
    return result


async def _feed(conn: Any, fifo: str, head: bytes, snap: Snapshot, paused: bool,
                progress: Callable[[int, int], None]) -> SendStats:
    """Run libvirt's restore of `fifo` and write the image into it, side by side."""
    import libvirt

    loop = asyncio.get_running_loop()
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
    restoring = loop.run_in_executor(None, conn.restoreFlags, fifo, None, flags)
    fd = -1
    try:
        fd = await _open_writer(fifo, restoring)
        writing = loop.run_in_executor(None, write_image, fd, head, snap, progress)
        try:
            stats = await writing
        finally:
            os.close(fd)  # libvirt sees the end of its image (early, if writing failed)
            fd = -1
        await restoring
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        outcome = await asyncio.gather(restoring, return_exceptions=True)
        if isinstance(err, libvirt.libvirtError):
            raise VmsnapError(f"libvirt restore failed: {dommod.message(err)}") from err
        if isinstance(outcome[0], libvirt.libvirtError):  # libvirt's side says why
            raise VmsnapError(f"libvirt restore failed: {dommod.message(outcome[0])}"
                              f" (vmsnap: {err})") from err
        raise
    return stats


async def _open_writer(fifo: str, restoring: asyncio.Future[Any]) -> int:
    """Open the FIFO for writing once libvirt opened it for reading; fail if libvirt's
    restore ends first (it refused before reading anything)."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        if restoring.done():
            await restoring
            raise VmsnapError("libvirt restore ended without reading the image")
        await asyncio.sleep(0.02)
