"""Unit tests of testbed.ramcheck with synthetic memory (no QEMU)."""

import numpy as np
import pytest

from testbed.ramcheck import (
    PAGE_SIZE,
    check_counter_pages,
    compare_with_saved,
    fill_pages,
    page_pattern,
    splitmix64,
)

MiB = 1 << 20
GiB = 1 << 30


def _splitmix64_ref(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _mem(ranges, counters_per_range, mode):
    return [
        fill_pages(s, (e - s) // PAGE_SIZE, c, mode)
        for (s, e), c in zip(ranges, counters_per_range, strict=True)
    ]


def _counter(chunk, page):
    return chunk[page * PAGE_SIZE : page * PAGE_SIZE + 8].view("<u8")


def test_splitmix64_matches_scalar_reference():
    xs = [0, 1, 2, 511, 512 * 1024 + 1, 2**63, 2**64 - 1]
    got = splitmix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [_splitmix64_ref(x) for x in xs]
    # well-known first output of splitmix64 seeded with 0
    assert _splitmix64_ref(0) == 0xE220A8397B1DCDAF


def test_page_pattern_layout():
    pfn = 0x400
    pat = page_pattern(pfn, 2)
    assert pat.shape == (2, 512)
    assert pat[0, 0] == 0 and pat[1, 0] == 0
    assert int(pat[1, 7]) == _splitmix64_ref((pfn + 1) * 512 + 7)
    # word at guest-physical address a is splitmix64(a >> 3)
    addr = (pfn + 1) * PAGE_SIZE + 7 * 8
    assert int(pat[1, 7]) == _splitmix64_ref(addr >> 3)


@pytest.mark.parametrize("mode", ["counter", "random"])
def test_constant_counters_pass(mode):
    ranges = [(4 * MiB, 8 * MiB), (4 * GiB, 4 * GiB + 2 * MiB)]
    r = check_counter_pages(ranges, _mem(ranges, [7, 7], mode), mode)
    assert r.ok, r
    assert r.edges == 0 and r.pages_checked == 1024 + 512
    assert r.first_counter == 7 and r.last_counter == 7
    r.raise_if_bad()


@pytest.mark.parametrize("mode", ["counter", "random"])
def test_one_edge_passes_even_across_ranges(mode):
    ranges = [(4 * MiB, 8 * MiB), (4 * GiB, 4 * GiB + 2 * MiB)]
    # edge exactly at the start of the second range
    r = check_counter_pages(ranges, _mem(ranges, [10, 9], mode), mode)
    assert r.ok and r.edges == 1 and r.edge_addr == 4 * GiB, r
    # edge in the middle of the first range
    c = np.full(1024, 10, dtype=np.uint64)
    c[300:] = 9
    mem = [fill_pages(4 * MiB, 1024, c, mode), fill_pages(4 * GiB, 512, 9, mode)]
    r = check_counter_pages(ranges, mem, mode)
    assert r.ok and r.edges == 1 and r.edge_addr == 4 * MiB + 300 * PAGE_SIZE, r


def test_ranges_may_be_given_unsorted():
    ranges = [(4 * GiB, 4 * GiB + MiB), (4 * MiB, 5 * MiB)]
    mem = _mem(ranges, [5, 6], "counter")  # ascending order: 6..6, 5..5 -> one edge
    r = check_counter_pages(ranges, mem, "counter")
    assert r.ok and r.edges == 1 and r.edge_addr == 4 * GiB, r


@pytest.mark.parametrize(
    "value, fragment",
    [(0, "never stamped"), (12, "between"), (100, "between"), (3, "between")],
)
def test_single_corrupt_counter_is_named(value, fragment):
    ranges = [(4 * MiB, 8 * MiB)]
    mem = _mem(ranges, [10], "counter")
    _counter(mem[0], 123)[0] = value
    r = check_counter_pages(ranges, mem, "counter")
    assert not r.ok
    assert r.first_bad_addr == 4 * MiB + 123 * PAGE_SIZE, r
    assert fragment in r.problem
    with pytest.raises(AssertionError, match="first bad page 0x47b000"):
        r.raise_if_bad()


def test_corrupt_counter_next_to_the_real_edge():
    ranges = [(4 * MiB, 8 * MiB)]
    c = np.full(1024, 10, dtype=np.uint64)
    c[500:] = 9
    c[700] = 20
    r = check_counter_pages(ranges, [fill_pages(4 * MiB, 1024, c, "counter")], "counter")
    assert not r.ok and r.first_bad_addr == 4 * MiB + 700 * PAGE_SIZE, r
    assert r.edges == 1


def test_two_edges_fail():
    c = np.full(1024, 10, dtype=np.uint64)
    c[100:] = 9
    c[600:] = 8
    r = check_counter_pages([(4 * MiB, 8 * MiB)], [fill_pages(4 * MiB, 1024, c, "counter")])
    assert not r.ok and r.edges == 2
    assert r.first_bad_addr == 4 * MiB + 600 * PAGE_SIZE
    assert "second edge" in r.problem


def test_increase_and_big_drop_fail():
    c = np.full(1024, 10, dtype=np.uint64)
    c[400:] = 11  # increase: stale tail
    r = check_counter_pages([(4 * MiB, 8 * MiB)], [fill_pages(4 * MiB, 1024, c, "counter")])
    assert not r.ok and r.first_bad_addr == 4 * MiB + 400 * PAGE_SIZE and "increases" in r.problem
    c[400:] = 8  # drop by 2
    r = check_counter_pages([(4 * MiB, 8 * MiB)], [fill_pages(4 * MiB, 1024, c, "counter")])
    assert not r.ok and "drops by 2" in r.problem


def test_unstamped_tail_fails_even_though_it_drops_by_one():
    c = np.full(1024, 1, dtype=np.uint64)
    c[900:] = 0  # first pass stopped before READY
    r = check_counter_pages([(4 * MiB, 8 * MiB)], [fill_pages(4 * MiB, 1024, c, "counter")])
    assert not r.ok and r.first_bad_addr == 4 * MiB + 900 * PAGE_SIZE
    assert "never stamped" in r.problem and r.bad_pages == 124


def test_counter_mode_rest_must_be_zero():
    ranges = [(4 * MiB, 8 * MiB)]
    mem = _mem(ranges, [3], "counter")
    mem[0][77 * PAGE_SIZE + 4000] = 1
    r = check_counter_pages(ranges, mem, "counter")
    assert not r.ok and r.first_bad_addr == 4 * MiB + 77 * PAGE_SIZE and "not zero" in r.problem
    assert check_counter_pages(ranges, mem, "counter", check_rest=False).ok


def test_random_mode_pattern_errors_are_named():
    ranges = [(4 * MiB, 6 * MiB), (4 * GiB, 4 * GiB + MiB)]
    mem = _mem(ranges, [3, 3], "random")
    assert check_counter_pages(ranges, mem, "random").ok
    # counter-mode memory is not random-mode memory
    assert not check_counter_pages(ranges, _mem(ranges, [3, 3], "counter"), "random").ok
    mem[1][5 * PAGE_SIZE + 8] ^= 0x80  # first pattern byte of page 5 of range 2
    mem[1][200 * PAGE_SIZE + 4095] ^= 1  # last byte of page 200
    r = check_counter_pages(ranges, mem, "random")
    assert not r.ok and r.first_bad_addr == 4 * GiB + 5 * PAGE_SIZE, r
    assert r.bad_pages == 2 and "splitmix64" in r.problem
    # a page copied to the wrong place (right counter, pattern of another pfn)
    mem = _mem(ranges, [3, 3], "random")
    mem[0][PAGE_SIZE : 2 * PAGE_SIZE] = mem[0][2 * PAGE_SIZE : 3 * PAGE_SIZE]
    r = check_counter_pages(ranges, mem, "random")
    assert not r.ok and r.first_bad_addr == 4 * MiB + PAGE_SIZE


def test_pattern_check_spans_chunk_boundaries():
    # more pages than one internal chunk
    npages = 16384 + 100
    start = 4 * GiB
    mem = fill_pages(start, npages, 2, "random")
    r = check_counter_pages([(start, start + npages * PAGE_SIZE)], [mem.tobytes()], "random")
    assert r.ok and r.pages_checked == npages
    mem[(16384 + 50) * PAGE_SIZE + 100] ^= 4
    r = check_counter_pages([(start, start + npages * PAGE_SIZE)], [mem], "random")
    assert not r.ok and r.first_bad_addr == start + (16384 + 50) * PAGE_SIZE


def test_bad_arguments():
    mem = fill_pages(4 * MiB, 1, 1, "counter")
    with pytest.raises(ValueError):
        check_counter_pages([(4 * MiB, 4 * MiB + PAGE_SIZE)], [mem], "bogus")
    with pytest.raises(ValueError):
        check_counter_pages([(4 * MiB, 4 * MiB + 2 * PAGE_SIZE)], [mem])
    with pytest.raises(ValueError):
        check_counter_pages([(4 * MiB + 1, 4 * MiB + PAGE_SIZE + 1)], [mem])
    with pytest.raises(ValueError):
        check_counter_pages([], [mem])
    r = check_counter_pages([], [])
    assert not r.ok


def _ws_memory(ranges, stride, count, ws_counters, mode="counter"):
    """Pages as a ws_mb guest leaves them: 1 outside the working set, `ws_counters` (one
    per working-set page, in address order) inside it."""
    npages = [(e - s) // PAGE_SIZE for s, e in ranges]
    c = np.ones(sum(npages), dtype=np.uint64)
    c[0:count * stride:stride] = ws_counters
    cuts = np.cumsum(npages)[:-1]
    return [fill_pages(s, len(part), part, mode)
            for (s, _), part in zip(ranges, np.split(c, cuts), strict=True)]


@pytest.mark.parametrize("mode", ["counter", "random"])
def test_workset_edge_passes_and_idle_pages_stay_one(mode):
    """The working set (every 7th page across both ranges, 200 pages) has one moving edge,
    even where it crosses from one range to the next; the other pages hold 1."""
    ranges = [(4 * MiB, 8 * MiB), (4 * GiB, 4 * GiB + 2 * MiB)]
    ws = np.full(200, 5, dtype=np.uint64)
    ws[160:] = 4  # page 160 * 7 = 1120: in the second range
    r = check_counter_pages(ranges, _ws_memory(ranges, 7, 200, ws, mode), mode,
                            workset=(7, 200))
    assert r.ok and r.edges == 1 and r.pages_checked == 1536, r
    assert r.edge_addr == 4 * GiB + (1120 - 1024) * PAGE_SIZE
    # first working-set pass under way: the pages not yet reached still hold 1
    ws[:] = 2
    ws[10:] = 1
    assert check_counter_pages(ranges, _ws_memory(ranges, 7, 200, ws, mode), mode,
                               workset=(7, 200)).ok
    # the whole-RAM rule reads the same memory as many edges: the working set is needed
    assert not check_counter_pages(ranges, _ws_memory(ranges, 7, 200, ws, mode), mode).ok


def test_workset_faults_are_named():
    ranges = [(4 * MiB, 8 * MiB)]
    ws = np.full(100, 9, dtype=np.uint64)
    ws[40:] = 8
    good = _ws_memory(ranges, 10, 100, ws)
    assert check_counter_pages(ranges, good, workset=(10, 100)).ok
    # a page outside the set that moved (a page restored into the wrong slot)
    mem = _ws_memory(ranges, 10, 100, ws)
    _counter(mem[0], 1001)[0] = 9
    r = check_counter_pages(ranges, mem, workset=(10, 100))
    assert not r.ok and r.first_bad_addr == 4 * MiB + 1001 * PAGE_SIZE, r
    assert "outside the working set" in r.problem and r.bad_pages == 1
    # a stale working-set page: its counter is behind its neighbours in the set
    mem = _ws_memory(ranges, 10, 100, ws)
    _counter(mem[0], 200)[0] = 8
    r = check_counter_pages(ranges, mem, workset=(10, 100))
    assert not r.ok and r.first_bad_addr == 4 * MiB + 200 * PAGE_SIZE and "between" in r.problem
    # a lost page outside the set reads 0
    mem = _ws_memory(ranges, 10, 100, ws)
    _counter(mem[0], 5)[0] = 0
    r = check_counter_pages(ranges, mem, workset=(10, 100))
    assert not r.ok and "never stamped" in r.problem
    # the page just past the set's last page is not in it
    mem = _ws_memory(ranges, 10, 100, ws)
    _counter(mem[0], 1000)[0] = 8
    assert not check_counter_pages(ranges, mem, workset=(10, 100)).ok
    with pytest.raises(ValueError):
        check_counter_pages(ranges, good, workset=(10, 104))  # page 1030 of 1024
    with pytest.raises(ValueError):
        check_counter_pages(ranges, good, workset=(0, 100))


def _saved_and_restored(mode, restored_counters):
    """(saved, restored) check results: saved = counters 9 up to an edge, 8 after it."""
    ranges = [(4 * MiB, 8 * MiB)]
    npages = 4 * MiB // PAGE_SIZE
    saved = np.full(npages, 8, dtype=np.uint64)
    saved[:100] = 9
    results = [check_counter_pages(ranges, _mem(ranges, [c], mode), mode)
               for c in (saved, restored_counters(saved))]
    assert all(r.ok for r in results), results  # each one is self-consistent
    return results


@pytest.mark.parametrize("mode", ["counter", "random"])
@pytest.mark.parametrize("how", ["zeroed, then one sweep", "stale block", "edge moved"])
def test_restored_ram_must_be_what_was_saved(mode, how):
    """RAM restored wrong as a whole passes the one-moving-edge rule (once the guest re-stamps
    zeroed counters they are valid again); against the save it fails, paused or after a run."""
    wrong = {"zeroed, then one sweep": lambda c: np.ones_like(c),
             "stale block": lambda c: c - np.uint64(5),
             "edge moved": lambda c: np.where(np.arange(c.size) < 200, 9, 8).astype(np.uint64)}
    saved, restored = _saved_and_restored(mode, wrong[how])
    assert "saved" in compare_with_saved(restored, saved, 0)
    if how != "edge moved":  # a guest that ran may have moved its edge
        assert "below 8" in compare_with_saved(restored, saved, 0, ran=True)
        assert "below 7" in compare_with_saved(restored, None, 7)


@pytest.mark.parametrize("mode", ["counter", "random"])
def test_restored_ram_as_saved_passes(mode):
    saved, restored = _saved_and_restored(mode, lambda c: c)
    assert compare_with_saved(restored, saved, 0) is None
    assert compare_with_saved(restored, None, 8) is None
    _, ran = _saved_and_restored(mode, lambda c: c + np.uint64(3))  # re-stamped 3 times
    assert compare_with_saved(ran, saved, 0, ran=True) is None
    assert compare_with_saved(ran, saved, 0) is not None  # not what the file holds


def test_restored_ram_failing_its_own_check_fails():
    saved, _ = _saved_and_restored("counter", lambda c: c)
    ranges = [(4 * MiB, 8 * MiB)]
    bad = check_counter_pages(ranges, _mem(ranges, [0], "counter"), "counter")
    assert "never stamped" in compare_with_saved(bad, saved, 0)
