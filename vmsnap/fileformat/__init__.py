"""The vmsnap snapshot file: QEMU mapped-ram layout + vmsnap trailer."""

from ..stream.events import MappedRamHeader, bitmap_size
from .bitmap import contiguous_runs, pack_bitmap, runs, unpack_bitmap
from .errors import (
    ChecksumMismatch,
    CorruptTrailer,
    IncompleteSnapshot,
    NoCommitRecord,
    SnapshotError,
    UnsupportedVersion,
)
from .layout import BlockLayout, FileLayout, compute_layout
from .reader import BlockInfo, Snapshot, VerifyResult, open_snapshot
from .trailer import Trailer, TrailerMetadata, decode_trailer_bytes, encode_trailer
from .writer import SnapshotWriter

__all__ = [
    "BlockInfo", "BlockLayout", "ChecksumMismatch", "CorruptTrailer", "FileLayout",
    "IncompleteSnapshot", "MappedRamHeader", "NoCommitRecord", "Snapshot", "SnapshotError",
    "SnapshotWriter", "Trailer", "TrailerMetadata", "UnsupportedVersion", "VerifyResult",
    "bitmap_size", "compute_layout", "contiguous_runs", "decode_trailer_bytes",
    "encode_trailer", "open_snapshot", "pack_bitmap", "runs", "unpack_bitmap",
]
