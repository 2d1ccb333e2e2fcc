"""info: what a snapshot file holds, as a dict fit for JSON and for a table."""

from __future__ import annotations

import os
from typing import TypedDict

from .. import targets
from ..fileformat.reader import open_snapshot
from ..hostkey import trust_of
from ..orchestration.relaunch import program_options


class BlockSummary(TypedDict):
    name: str
    used_length: int
    pages: int
    present_pages: int
    zero_pages: int


class SnapshotInfo(TypedDict):
    """What `vmsnap info` shows (and prints with --json)."""

    path: str
    format: str
    integrity: str
    pages_checked: bool
    format_version: int | None
    qemu_version: str | None
    machine_type: str
    created: str | None
    command_line: list[str] | None
    command_line_trusted: bool | None
    command_line_trust: str | None
    command_line_runs_programs: list[str] | None
    ram_bytes: int
    present_bytes: int
    apparent_size: int
    allocated_size: int | None
    blocks: list[BlockSummary]


def describe(path: str | os.PathLike[str], *, direct: bool = True) -> SnapshotInfo:
    """Blocks, sizes, origin and integrity state of the snapshot at `path`."""
    with open_snapshot(path, direct=direct) as snap:
        meta = snap.metadata
        command = meta.command_line if meta else None
        trust = trust_of(snap.trailer)
        blocks: list[BlockSummary] = [
            {"name": b.name, "used_length": b.used_length, "pages": b.npages,
             "present_pages": b.present_count, "zero_pages": b.npages - b.present_count}
            for b in snap.blocks]
        return {
            "path": os.fspath(path),
            "format": "qemu-native mapped-ram" if snap.native else "vmsnap",
            "integrity": ("no checksums (QEMU-native file)" if snap.native
                          else "complete, checksummed" if snap.pages_checked
                          else "complete; device state checksummed, page checksums pending "
                               "(run `vmsnap seal`)"),
            "pages_checked": snap.pages_checked,
            "format_version": meta.format_version if meta else None,
            "qemu_version": meta.qemu_version if meta else None,
            "machine_type": snap.machine_type,
            "created": meta.created if meta else None,
            "command_line": command,
            "command_line_trusted": trust.trusted if command else None,
            "command_line_trust": trust.reason if command else None,
            "command_line_runs_programs": program_options(command) if command else None,
            "ram_bytes": sum(b.used_length for b in snap.blocks),
            "present_bytes": sum(b.present_count * b.page_size for b in snap.blocks),
            "apparent_size": snap.file_size,
            "allocated_size": _allocated(path),
            "blocks": blocks,
        }


def _allocated(path: str | os.PathLike[str]) -> int | None:
    """Bytes a local file occupies on disk (None for RBD/S3 targets)."""
    return None if targets.remote(path) else os.stat(path).st_blocks * 512
