"""What a sender must know of an `-incoming` QEMU before it sends (its UUID and machine type),
as the target's checks find it (vmsnap.orchestration.target): standard library only, so
that a restore that sends no multifd channels (a lazy one) does not load them to check its
target."""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PER_SECTION = "per-section"
PER_ROUND = "per-round"
SYNC_MODES = (PER_SECTION, PER_ROUND)

_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)(?:-machine)?$")


def sync_mode_for_machine(machine: str) -> str:
    """The multifd sync protocol a destination with resolved machine type `machine`
    (e.g. "pc-q35-7.2", "pc-i440fx-8.1-machine" as `qom-get /machine type` says) expects:
    ≤ 8.0 → per-section (flush after each section, `hw_compat_8_0`), ≥ 8.1 → per-round.
    Aliases ("q35", "pc") must be resolved first: their meaning depends on the QEMU."""
    m = _MACHINE_VERSION.search(machine.strip())
    if not m:
        raise ValueError(f"machine type {machine!r} has no version: resolve the alias first "
                         "(QMP qom-get path=/machine property=type)")
    return PER_SECTION if (int(m.group(1)), int(m.group(2))) <= (8, 0) else PER_ROUND


@dataclass(frozen=True)
class Destination:
    """What the sender must know of an `-incoming` QEMU: its UUID (multifd channels send
    it) and its resolved machine type (which fixes the sync protocol)."""

    uuid: bytes
    machine: str

    @property
    def sync_mode(self) -> str:
        return sync_mode_for_machine(self.machine)


def destination(query_uuid: Mapping[str, Any], machine_type: object) -> Destination:
    """The Destination from QMP `query-uuid`'s reply and `qom-get path=/machine
    property=type`'s (e.g. "pc-q35-7.2-machine")."""
    return Destination(uuidlib.UUID(str(query_uuid["UUID"])).bytes,
                       str(machine_type).removesuffix("-machine"))
