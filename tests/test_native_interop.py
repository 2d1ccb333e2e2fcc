"""vmsnap's files and QEMU's own mapped-ram files are the same format, both ways:

(a) a file vmsnap wrote from a QEMU 7.2 stream loads natively into QEMU 10 with the same
    machine type (`-machine pc-q35-7.2`, `migrate-incoming file:` + mapped-ram);
(b) vmsnap reads files QEMU 10 wrote itself (`migrate file:` + mapped-ram, with and without
    multifd + direct-io): `info` says QEMU-native without checksums and `send` restores them.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from testbed.guests import BootGuest
from testbed.qemu import Vm, exec_uri
from testbed.transfer import VMSNAP, migrate_parameters, restore_with_vmsnap, wait_committed

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def vmsnap(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([VMSNAP, *map(str, args)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def test_vmsnap_file_from_qemu72_loads_natively_into_qemu10(workdir):
    guest = BootGuest(memory_mb=256, limit_mb=64)
    snap = workdir / "guest.vms"
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:
        guest.boot(vm)
        vm.stop()
        with guest.saving(vm) as saved:
            vm.migrate(exec_uri(VMSNAP, "receive", snap), parameters=migrate_parameters(False))
            wait_committed(snap, vm)
    info = json.loads(vmsnap("info", "--json", snap).stdout)
    assert info["machine_type"] == "pc-q35-7.2" and info["format"] == "vmsnap"
    config = guest.config("10", workdir, machine="pc-q35-7.2")
    with Vm(config, workdir, "dst", incoming="defer") as vm:
        vm.set_migration(capabilities={"mapped-ram": True})
        vm.cmd("migrate-incoming", uri=f"file:{snap}")
        vm.wait_incoming()
        guest.check_restored(vm, saved)


NATIVE = {
    "mapped-ram": ({"mapped-ram": True}, {}),
    "multifd-direct-io": ({"mapped-ram": True, "multifd": True},
                          {"direct-io": True, "multifd-channels": 2}),
}


@pytest.mark.parametrize("how", [*NATIVE, "suppress-vmdesc"])
def test_vmsnap_reads_and_sends_qemu10_native_file(workdir, how):
    """suppress-vmdesc: the stream ends with a bare EOF byte, whole only if its device state
    chains up as sections (vmsnap.stream.sections)."""
    caps, params = NATIVE.get(how, NATIVE["mapped-ram"])
    guest = BootGuest(memory_mb=256, limit_mb=64)
    config = guest.config("10", workdir, machine="q35,suppress-vmdesc=on"
                          if how == "suppress-vmdesc" else "q35")
    native = workdir / "native.img"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        vm.stop()
        with guest.saving(vm) as saved:
            vm.migrate(f"file:{native}", capabilities=caps,
                       parameters={**migrate_parameters(False), **params})
    with open(native, "rb") as f:
        f.seek(-1, 2)
        assert (f.read() == b"\0") == (how == "suppress-vmdesc")  # EOF byte, or vmdesc JSON
    info = json.loads(vmsnap("info", "--json", native).stdout)
    assert info["format"] == "qemu-native mapped-ram", info
    assert "no checksums" in info["integrity"]
    assert info["qemu_version"] is None and info["machine_type"].startswith("pc-q35-")
    assert next(b for b in info["blocks"] if b["name"] == "pc.ram")["present_pages"] > 0
    verify = subprocess.run([VMSNAP, "verify", str(native)], capture_output=True, timeout=600)
    assert verify.returncode != 0 and b"no checksums" in verify.stderr
    restore_with_vmsnap(guest, config, workdir, native, saved)
