"""Find the shared-memory backings of a QEMU's guest RAM, so vmsnap can copy RAM itself.

A RAM block backed by `memory-backend-file` or `memory-backend-memfd` with `share=on` is
a file both QEMU and vmsnap can map. QMP names the backends (`query-memdev`: id, size,
share; `qom-get`: type, mem-path, offset); the QEMU process holds each one open, so
vmsnap opens it through `/proc/<QEMU pid>/fd/<n>`, which works across mount namespaces
(a chrooted QEMU's mem-path means nothing on the host). The fd is told apart from others
by the QEMU's shared mapping of exactly the backend's size and offset, on the same inode.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import VmsnapError
from ..stream.constants import CAP_IGNORE_SHARED as IGNORE_SHARED
from . import qmp as qmpmod
from .qmp import Monitor, Peer, QmpCommandError

if TYPE_CHECKING:
    from ..ops.shared_ram import Backing

log = logging.getLogger(__name__)

#: QEMU >= 8.1 leaves memfd (unnamed) shared RAM in the stream even with x-ignore-shared.
NAMED_FILE_RULE = (8, 1, 0)


class SharedRamUnreachable(VmsnapError):
    """A shared RAM backing exists but vmsnap cannot open it."""


@dataclass(frozen=True)
class Memdev:
    id: str
    type: str
    size: int
    mem_path: str | None
    offset: int


@dataclass(frozen=True)
class _Mapping:
    length: int
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str


async def _qom(client: Monitor, path: str, prop: str) -> object | None:
    try:
        value: object = await client.execute("qom-get", {"path": path, "property": prop})
        return value
    except QmpCommandError:
        return None


async def shared_memdevs(client: Monitor, memdevs: list[dict[str, Any]] | None = None
                         ) -> list[Memdev]:
    """The memory backends of this QEMU that are mapped shared (share=on); `memdevs`:
    its `query-memdev` reply, if the caller has it."""
    out = []
    for m in memdevs if memdevs is not None else await client.execute("query-memdev"):
        if not m.get("share") or not m.get("id"):
            continue
        obj = f"/objects/{m['id']}"
        kind = str(await _qom(client, obj, "type") or "")
        mem_path = await _qom(client, obj, "mem-path")
        offset = await _qom(client, obj, "offset")
        out.append(Memdev(m["id"], kind, int(m["size"]),
                          mem_path if isinstance(mem_path, str) else None,
                          offset if isinstance(offset, int) else 0))
    return out


def ignored_by(peer: Peer, dev: Memdev) -> bool:
    """Whether this QEMU's x-ignore-shared leaves `dev` out of the stream (newer QEMUs
    only ignore shared RAM backed by a named file)."""
    return peer.version < NAMED_FILE_RULE or dev.type == "memory-backend-file"


async def block_addr(client: Monitor, dev: Memdev) -> int:
    """The guest-physical `addr` of the backend's memory region (checked by an
    x-ignore-shared destination; 0 for a backend mapped through aliases)."""
    addr = await _qom(client, f"/objects/{dev.id}/{dev.id}[0]", "addr")
    return addr if isinstance(addr, int) else 0


def _maps(pid: int) -> list[_Mapping]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[1][3] != "s":
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            out.append(_Mapping(end - start, int(parts[2], 16), (major, minor), int(parts[4]),
                                parts[5].rstrip("\n")))
    return out


def _describes(dev: Memdev, path: str) -> bool:
    if dev.type == "memory-backend-memfd":
        return path.startswith("/memfd:")
    if dev.mem_path is None:
        return False
    name = os.path.basename(dev.mem_path.rstrip("/"))
    base = path.removesuffix(" (deleted)")
    return os.path.basename(base) == name or os.path.dirname(base).endswith(name)


def open_backings(pid: int | None, devs: list[Memdev], *, writable: bool
                  ) -> dict[str, Backing]:
    """Open every shared backend of QEMU `pid` (read-only, or read-write for a restore).
    Raises SharedRamUnreachable naming the first one that cannot be opened."""
    from ..ops.shared_ram import Backing  # the copying machinery: only where RAM is shared

    if pid is None:
        raise SharedRamUnreachable("QEMU's process is unknown (QMP over TCP)")
    try:
        maps = _maps(pid)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as err:
        raise SharedRamUnreachable(f"cannot read /proc/{pid}: {err.strerror}") from err
    by_inode: dict[tuple[tuple[int, int], int], str] = {}
    for name in fds:
        link = f"/proc/{pid}/fd/{name}"
        try:
            st = os.stat(link)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            by_inode.setdefault(((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino), link)
    out: dict[str, Backing] = {}
    try:
        for dev in devs:
            found = {(m.dev, m.inode) for m in maps
                     if m.length == dev.size and m.offset == dev.offset
                     and _describes(dev, m.path) and (m.dev, m.inode) in by_inode}
            if len(found) != 1:
                why = "not found" if not found else f"{len(found)} candidates"
                raise SharedRamUnreachable(
                    f"shared RAM {dev.id!r} ({dev.type}): its file in QEMU {pid} is {why}")
            link = by_inode[found.pop()]
            try:
                fd = os.open(link, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            except OSError as err:
                raise SharedRamUnreachable(
                    f"shared RAM {dev.id!r}: cannot open {link}: {err.strerror}") from err
            out[dev.id] = Backing(dev.id, fd, dev.offset, dev.size)
    except BaseException:
        for b in out.values():
            b.close()
        raise
    return out


async def save_backings(client: Monitor, peer: Peer) -> dict[str, Backing] | None:
    """For a paused save: the shared backings vmsnap copies itself (QEMU leaves them out
    of the stream), or None when QEMU must stream all RAM (no shared RAM it would leave
    out, no x-ignore-shared, or a backing vmsnap cannot open)."""
    if IGNORE_SHARED not in await qmpmod.capabilities(client):
        return None
    devs = [d for d in await shared_memdevs(client) if ignored_by(peer, d)]
    if not devs:
        return None
    try:
        return open_backings(peer.pid, devs, writable=False)
    except SharedRamUnreachable as err:
        log.info("saving shared RAM through the stream: %s", err)
        return None


@dataclass
class RestorePlan:
    """Shared RAM a restore fills itself, and the addr of each block for the stream."""

    backings: dict[str, Backing]
    addrs: dict[str, int]
    pages: int = 0  # filled so far

    def close(self) -> None:
        for b in self.backings.values():
            b.close()


async def restore_plan(client: Monitor, peer: Peer, blocks: set[str],
                       capabilities: Collection[str], memdevs: list[dict[str, Any]]
                       ) -> RestorePlan | None:
    """For a restore into `peer` (its migration `capabilities` and `query-memdev` reply):
    its shared backings (vmsnap fills them from the file and streams only the rest), or
    None when the whole snapshot goes through the stream (no shared RAM, no
    x-ignore-shared). Raises SharedRamUnreachable if QEMU has shared RAM for one of the
    snapshot's `blocks` that vmsnap cannot open."""
    if IGNORE_SHARED not in capabilities:
        return None
    devs = [d for d in await shared_memdevs(client, memdevs) if d.id in blocks]
    if not devs:
        return None
    backings = open_backings(peer.pid, devs, writable=True)
    return RestorePlan(backings, {d.id: await block_addr(client, d) for d in devs})
