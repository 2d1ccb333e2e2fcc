"""Hot pages: the pages a guest asked for first during a lazy restore, kept beside the
snapshot so the next lazy restore sends them first: the file `FILE.hot`, the S3 object
`KEY.hot`, or the RBD image's metadata key `vmsnap.hot` (targets.write_beside).

The hint is written atomically (a file 0600) and is tied to the snapshot it was recorded on
by the snapshot's commit record: a missing, damaged, oversized or stale hint is ignored,
and so is a store that cannot be read or written. It only changes the order pages are sent
in, so it can never spoil a restore or the snapshot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .. import targets
from .reader import Snapshot

SUFFIX = ".hot"
VERSION = 1
#: a hint larger than this is not read (it would be most of RAM anyway)
MAX_BYTES = 32 << 20


def hot_path(snapshot_path: str | os.PathLike) -> str:
    """Where a local snapshot's hint is."""
    return os.fspath(snapshot_path) + SUFFIX


def _identity(snap: Snapshot) -> str:
    """What names this very snapshot: its commit (stream end + trailer) or, for a native
    file, size and stream end."""
    if snap.trailer is not None:
        return snap.trailer.commit.pack().hex()
    return f"native:{snap.file_size}:{snap.stream_end}"


def load_hot(snap: Snapshot) -> dict[str, np.ndarray]:
    """The hot pages recorded for `snap`, or {} when there is no valid hint for it."""
    try:
        raw = targets.read_beside(snap.path, SUFFIX, MAX_BYTES)
        if raw is None:
            return {}
        doc = json.loads(raw)
        if doc.get("version") != VERSION or doc.get("snapshot") != _identity(snap):
            return {}
        names = {b.name: b.npages for b in snap.blocks}
        out = {}
        for name, pages in doc["blocks"].items():
            arr = np.asarray(pages, dtype=np.int64)
            if name in names and arr.ndim == 1:
                out[name] = arr[(arr >= 0) & (arr < names[name])]
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def save_hot(snap: Snapshot, requested: Mapping[str, Sequence[int]]) -> None:
    """Record the pages requested first (first-request order) for the next restore."""
    doc = {"version": VERSION, "snapshot": _identity(snap),
           "blocks": {name: list(dict.fromkeys(int(p) for p in pages))
                      for name, pages in requested.items()}}
    targets.write_beside(snap.path, SUFFIX, json.dumps(doc, separators=(",", ":")))
