"""The test bed proves itself: QEMU's own exec:cat migration round trip passes the RAM check
for both guests and both QEMU versions, and a single corrupted page is caught."""

from __future__ import annotations

import pytest

from testbed.cases import make_guest, round_trip_params
from testbed.guests import BootGuest, GuestCheckFailed
from testbed.qemu import Vm, exec_uri
from testbed.streams import page_data_positions
from testbed.transfer import save_with_cat


@pytest.mark.qemu
@round_trip_params()
def test_exec_cat_round_trip(kind, live, qemu, workdir):
    guest = make_guest(kind, live)
    config = guest.config(qemu, workdir)
    stream = workdir / "stream"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        save_with_cat(vm, stream, live)
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", stream)) as vm:
        vm.wait_incoming()
        guest.check_restored(vm)


@pytest.mark.qemu
def test_ram_check_catches_one_corrupted_page(qemu_version, workdir):
    guest = BootGuest(memory_mb=256)
    config = guest.config(qemu_version, workdir)
    stream = workdir / "stream"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        save_with_cat(vm, stream, live=False)
    start, end = guest.ranges[0]
    victim = start + ((end - start) // 2 & ~0xFFF)
    position = page_data_positions(stream)[victim]
    with open(stream, "r+b") as f:
        f.seek(position)
        counter = f.read(1)[0]
        f.seek(position)
        f.write(bytes([(counter + 0x55) & 0xFF]))
    with Vm(config, workdir, "dst", incoming=exec_uri("cat", stream)) as vm:
        vm.wait_incoming()
        with pytest.raises(GuestCheckFailed, match=f"{victim:#x}"):
            guest.check_restored(vm)
