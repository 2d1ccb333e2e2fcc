"""restore --lazy=mmap --populate: QEMU copies every mapped page privately while the guest
runs, so the guest's own first touch of a page is no longer a copy-on-write fault.

On a private file mapping, the guest's first write to each 4 KiB page is a copy-on-write
fault taken inside KVM's fault handler, which costs tens of µs per page in a nested KVM
(the guest's first pass over 1 GiB: ~8 s). QEMU's `prealloc` property, set on the running
backend, has the kernel do those copies itself (MADV_POPULATE_WRITE, in `prealloc-threads`
threads); a page the guest already wrote is left as it is, so it races with nothing. The
price: every page becomes private (VMs restored from one file no longer share its page
cache), and QEMU's main loop waits for it (device emulation and QMP pause meanwhile; vCPUs
go on). On this nested host the copy took ~3 µs per page at 1 GiB (0.7-0.8 s) but ~17-20
µs at 4 and 8 GiB (17-18 s, 40-42 s; bench/results/lazy-qemu10-20261203-225712.json), so
it pays off for small guests only.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import TYPE_CHECKING

from ..errors import VmsnapError
from ..io.madvise import MADV_POPULATE_WRITE
from .mapped import MAPPED_BLOCK

if TYPE_CHECKING:  # the standard library only before QEMU starts: see orchestration.early
    from .qmp import Monitor

#: QEMU's populate threads (its default: one per vCPU). One leaves the host's other CPUs
#: to the running guest, and was the fastest here even with the guest paused (1 GiB on 2
#: loaded cores: 0.39-0.53 s with one thread, 0.96-2.81 s with two)
POPULATE_THREADS = 1
#: the longest QEMU may take per GiB on top of the usual command timeout
SECONDS_PER_GIB = 10.0


def check_populate() -> None:
    """Refuse a kernel without MADV_POPULATE_WRITE: QEMU would then read and write back a
    byte of each page itself, which loses a running guest's write to that byte."""
    with mmap.mmap(-1, mmap.PAGESIZE) as probe:
        try:
            probe.madvise(MADV_POPULATE_WRITE)
        except OSError as err:
            raise VmsnapError(f"--populate needs Linux >= 5.14 (MADV_POPULATE_WRITE): "
                              f"{os.strerror(err.errno or 0)} here") from None


async def populate(client: Monitor, size: int) -> float:
    """Have QEMU make every page of the mapped block private; seconds it took (its main
    loop waited that long)."""
    from .qmp import COMMAND_TIMEOUT, QemuGoneError

    t0 = time.monotonic()
    path = f"/objects/{MAPPED_BLOCK}"
    try:
        await client.execute("qom-set", {"path": path, "property": "prealloc-threads",
                                         "value": POPULATE_THREADS})
        await client.execute("qom-set", {"path": path, "property": "prealloc", "value": True},
                             timeout=COMMAND_TIMEOUT + SECONDS_PER_GIB * size / (1 << 30))
    except QemuGoneError:
        raise QemuGoneError("QEMU ended while it copied the guest's RAM (--populate): the "
                            "guest is gone") from None
    return time.monotonic() - t0
