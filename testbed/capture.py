"""Capture real migration streams and QEMU-native mapped-ram files as test inputs."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from testbed.qemu import Vm, VmConfig, exec_uri


def capture(out: Path, *, qemu: str = "7.2", machine: str = "q35", memory_mb: int = 128,
            mapped_ram: bool = False, capabilities: Sequence[str] = ()) -> Path:
    """Migrate a paused QEMU (-S: firmware and ROMs, no guest code run) to `out`: a plain
    stream through exec:cat, or a mapped-ram file through `file:`."""
    workdir = Path(tempfile.mkdtemp(prefix="vmsnap-capture-"))
    try:
        target = workdir / "stream"
        caps = dict.fromkeys([*capabilities, *(["mapped-ram"] if mapped_ram else [])], True)
        uri = f"file:{target}" if mapped_ram else exec_uri("cat", stdout=target)
        with Vm(VmConfig(qemu=qemu, machine=machine, memory_mb=memory_mb), workdir) as vm:
            vm.migrate(uri, capabilities=caps)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(target, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out
