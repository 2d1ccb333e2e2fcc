"""Hot pages: the pages a guest asked for first during a lazy restore, or the pages a live
save saw re-dirtied in its last rounds, kept beside the snapshot so the next lazy restore
sends them first: the file `FILE.hot`, the S3 object `KEY.hot`, or the RBD image's metadata
key `vmsnap.hot` (targets.write_beside).

The hint is written atomically (a file 0600) and is tied to the snapshot it was recorded on
by the snapshot's commit record: a missing, damaged, oversized or stale hint is ignored,
and so is a store that cannot be read or written. It only changes the order pages are sent
in, so it can never spoil a restore or the snapshot.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Container, Mapping, Sequence

import numpy as np

from .. import targets
from ..errors import VmsnapError
from .reader import BlockInfo, Snapshot, open_snapshot

SUFFIX = ".hot"
VERSION = 1
#: a hint larger than this is not read (it would be most of RAM anyway)
MAX_BYTES = 32 << 20
#: pages of an earlier hint kept in a new one, per block (~8 MB of JSON at most)
MAX_KEPT = 1 << 20


def hot_path(snapshot_path: str | os.PathLike[str]) -> str:
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


def present_hot(snap: Snapshot, hot: Mapping[str, np.ndarray]
                ) -> list[tuple[BlockInfo, np.ndarray]]:
    """The hint's pages present in `snap`, per block, ascending."""
    out = []
    for b in snap.blocks:
        if b.name in hot:
            pages = np.unique(np.asarray(hot[b.name], dtype=np.int64))
            pages = pages[(pages >= 0) & (pages < b.npages)]
            out.append((b, pages[b.present[pages]]))
    return out


def prefetch_hot(snap: Snapshot, blocks: Container[str]) -> int:
    """Have the kernel read the hinted pages of `blocks` of a local snapshot into the page
    cache (for a guest whose RAM maps the file); how many pages were asked for."""
    pages = 0
    try:
        for b, hot in present_hot(snap, load_hot(snap)):
            if b.name in blocks:
                snap.prefetch_pages(b, hot)
                pages += len(hot)
    except OSError:  # only a hint
        pass
    return pages


def save_hot(snap: Snapshot, requested: Mapping[str, Sequence[int]],
             kept: Mapping[str, Sequence[int] | np.ndarray] | None = None) -> None:
    """Record the pages requested first (first-request order) for the next restore, then
    those of the hint this restore was given (`kept`, at most MAX_KEPT per block): it sent
    them first, so the guest did not ask for them; a hint that worked would otherwise give
    way to the few pages still asked for, and the restore after it would go without."""
    kept = kept or {}
    blocks = {}
    for name in dict.fromkeys([*requested, *kept]):
        pages = dict.fromkeys(int(p) for p in requested.get(name, ()))
        more = (int(p) for p in kept.get(name, ()) if int(p) not in pages)
        pages.update(dict.fromkeys(itertools.islice(more, MAX_KEPT)))
        blocks[name] = list(pages)
    doc = {"version": VERSION, "snapshot": _identity(snap), "blocks": blocks}
    targets.write_beside(snap.path, SUFFIX, json.dumps(doc, separators=(",", ":")))


class RewriteTracker:
    """A live save's rounds as its receiver sees them. QEMU sends a dirty page at most once
    per dirty-bitmap sync, so a page written again means a sync came in between: it starts
    the receiver's next round. (A round begins at the first such page, so the receiver's
    rounds may start later than QEMU's syncs, never earlier.) Both receivers feed every page
    write (data or zero) through the SnapshotWriter, which calls `note`; multifd channel
    threads may call it at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.round = 1
        self._last: dict[str, np.ndarray] = {}  # block -> round of each page's last write
        self._again: dict[str, np.ndarray] = {}  # block -> page written more than once

    def note(self, block: str, npages: int, pages: np.ndarray) -> None:
        with self._lock:
            last = self._last.get(block)
            if last is None:
                last = self._last[block] = np.zeros(npages, dtype=np.uint32)
                self._again[block] = np.zeros(npages, dtype=bool)
            seen = last[pages]
            if (seen == self.round).any():
                self.round += 1
            self._again[block][pages[seen > 0]] = True
            last[pages] = self.round

    def hot(self) -> dict[str, np.ndarray]:
        """Pages re-dirtied late: written more than once, last in the last two rounds
        (after the last-but-one sync the receiver can tell)."""
        with self._lock:
            return {name: np.flatnonzero(self._again[name] & (last >= self.round - 1))
                    for name, last in self._last.items()}


def save_rewrites(path: str, tracker: RewriteTracker) -> int:
    """Record a committed live save's late re-dirtied pages as its hint; the number of
    pages recorded (0 when there were none, or the hint could not be written: it is only a
    hint, and is written after the commit, so it never touches the snapshot)."""
    pages = {name: p for name, p in tracker.hot().items() if len(p)}
    if not pages:
        return 0
    try:
        with open_snapshot(path) as snap:  # ties the hint to this very commit
            save_hot(snap, {name: p.tolist() for name, p in pages.items()})
    except (OSError, VmsnapError):
        return 0
    return sum(len(p) for p in pages.values())
