"""Typed errors of the snapshot file format (VmsnapError and ValueError subclasses)."""

from __future__ import annotations

from ..errors import VmsnapError


class SnapshotError(VmsnapError, ValueError):
    """A snapshot file is malformed, incomplete or corrupt (one-line message)."""


class NoCommitRecord(SnapshotError):
    """The file does not end with a vmsnap commit record (QEMU-native or incomplete)."""


class CorruptTrailer(SnapshotError):
    """A vmsnap commit record/trailer is present but damaged."""


class UnsupportedVersion(CorruptTrailer):
    """The trailer was written by an unknown (newer) vmsnap format version."""


class IncompleteSnapshot(SnapshotError):
    """No commit record and the QEMU stream is not complete (interrupted write)."""


class ChecksumMismatch(SnapshotError):
    """A page or stream byte range does not match its recorded xxh3-64."""

    def __init__(self, message: str, *, block: str | None = None, offset: int | None = None,
                 file_offset: int | None = None) -> None:
        super().__init__(message)
        self.block = block
        self.offset = offset
        self.file_offset = file_offset
