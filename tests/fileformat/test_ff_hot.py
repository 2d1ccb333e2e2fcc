"""FILE.hot: the hot-page hint beside a snapshot is tied to it and only ever a hint."""

import os

import numpy as np
from test_ff_roundtrip import write_random

from vmsnap.fileformat import open_snapshot
from vmsnap.fileformat.hot import hot_path, load_hot, save_hot


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
