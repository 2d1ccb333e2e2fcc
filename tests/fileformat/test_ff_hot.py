"""FILE.hot: the hot-page hint beside a snapshot is tied to it and only ever a hint."""

import os

import numpy as np
from test_ff_roundtrip import write_random

from vmsnap.fileformat import open_snapshot
from vmsnap.fileformat.hot import RewriteTracker, hot_path, load_hot, save_hot, save_rewrites


def test_hot_pages_round_trip_and_staleness(tmp_path):
    path = str(tmp_path / "a.vms")
    write_random(path, np.random.default_rng(1))
    with open_snapshot(path) as snap:
        assert load_hot(snap) == {}  # no hint yet
        save_hot(snap, {"pc.ram": [5, 3, 5, 9999999], "nope": [1]})
        got = load_hot(snap)
    assert list(got) == ["pc.ram"] and list(got["pc.ram"]) == [5, 3]  # deduped, in range
    assert oct(os.stat(hot_path(path)).st_mode & 0o777) == "0o600"
    write_random(path, np.random.default_rng(2))  # a new snapshot at the same path
    with open_snapshot(path) as snap:
        assert load_hot(snap) == {}  # the old hint is stale: ignored
    for junk in (b"", b"{", b"[1,2]", b'{"version": 1}', b"\xff" * 100):
        with open(hot_path(path), "wb") as f:
            f.write(junk)
        with open_snapshot(path) as snap:
            assert load_hot(snap) == {}


def test_rewrite_tracker_rounds():
    """A page written again starts the receiver's next round; hot = pages written more
    than once whose last write fell in the last two rounds."""
    t = RewriteTracker()
    a = np.arange
    t.note("pc.ram", 100, a(100))  # bulk pass (round 1)
    t.note("rom", 4, a(4))
    t.note("pc.ram", 100, a(0, 40))  # re-dirtied: round 2
    t.note("pc.ram", 100, a(40, 50))  # still round 2 (first time again for these)
    t.note("pc.ram", 100, a(10, 20))  # round 3
    t.note("pc.ram", 100, a(10, 15))  # round 4: 0-9 and 20-49 fell out of the last two
    assert t.round == 4
    hot = t.hot()
    assert hot["pc.ram"].tolist() == list(range(10, 20)) and hot["rom"].tolist() == []


def test_rewrite_tracker_paused_save_has_none():
    t = RewriteTracker()
    for first in range(0, 1000, 100):  # every page once, in pieces: one round
        t.note("pc.ram", 1000, np.arange(first, first + 100))
    assert t.round == 1 and t.hot()["pc.ram"].size == 0


def test_save_rewrites_writes_a_hint_tied_to_the_commit(tmp_path):
    path = str(tmp_path / "a.vms")
    write_random(path, np.random.default_rng(3))
    t = RewriteTracker()
    assert save_rewrites(path, t) == 0 and not os.path.exists(hot_path(path))
    t.note("pc.ram", 64, np.arange(64))
    t.note("pc.ram", 64, np.array([7, 3]))
    assert save_rewrites(path, t) == 2
    with open_snapshot(path) as snap:
        assert sorted(load_hot(snap)["pc.ram"].tolist()) == [3, 7]
    assert save_rewrites(str(tmp_path / "missing.vms"), t) == 0  # never raises


def test_new_hint_keeps_the_pages_the_old_one_sent_first(tmp_path):
    """A restore given a hint asks only for the pages the hint missed: its new hint is
    those, in request order, then the old hint's (so a hint that worked is not lost)."""
    path = str(tmp_path / "a.vms")
    write_random(path, np.random.default_rng(1))
    with open_snapshot(path) as snap:
        save_hot(snap, {"pc.ram": [9, 3]}, {"pc.ram": np.array([1, 3, 5]), "other": [2]})
        got = load_hot(snap)
    assert got["pc.ram"].tolist() == [9, 3, 1, 5]
