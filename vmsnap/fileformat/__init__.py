"""The vmsnap snapshot file: QEMU mapped-ram layout + vmsnap trailer.

The names below load on first use (see vmsnap.exports): `vmsnap.fileformat.trailer` loads
without the reader, the writer and numpy."""

from typing import TYPE_CHECKING

from ..exports import load_export

#: public name -> the module that defines it
_EXPORTS = {
    "MappedRamHeader": "..stream.events", "bitmap_size": "..stream.events",
    **dict.fromkeys(("contiguous_runs", "pack_bitmap", "runs", "unpack_bitmap"), ".bitmap"),
    **dict.fromkeys(("ChecksumMismatch", "CorruptTrailer", "IncompleteSnapshot",
                     "NoCommitRecord", "SnapshotError", "UnsupportedVersion"), ".errors"),
    **dict.fromkeys(("BlockLayout", "FileLayout", "compute_layout"), ".layout"),
    **dict.fromkeys(("BlockInfo", "Snapshot", "VerifyResult", "open_snapshot"), ".reader"),
    **dict.fromkeys(("Trailer", "TrailerMetadata", "decode_trailer_bytes", "encode_trailer"),
                    ".trailer"),
    "SnapshotWriter": ".writer",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> object:
    return load_export(__name__, _EXPORTS, globals(), name)


__all__ = [
    "BlockInfo", "BlockLayout", "ChecksumMismatch", "CorruptTrailer", "FileLayout",
    "IncompleteSnapshot", "MappedRamHeader", "NoCommitRecord", "Snapshot", "SnapshotError",
    "SnapshotWriter", "Trailer", "TrailerMetadata", "UnsupportedVersion", "VerifyResult",
    "bitmap_size", "compute_layout", "contiguous_runs", "decode_trailer_bytes",
    "encode_trailer", "open_snapshot", "pack_bitmap", "runs", "unpack_bitmap",
]
