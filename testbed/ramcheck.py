"""Host-side check of the RAM written by the ``bootguest`` test guest.

Pure numpy, no I/O: the caller passes the ``RANGE`` list printed by the guest and the
memory contents of each range (e.g. read with QMP ``pmemsave``).

Guest contract (``guests/bootguest/bootguest.S``):

* every 4 KiB page of every range holds a little-endian u64 counter at offset 0; the guest
  increments the counters in ascending guest-physical address order, forever, so a snapshot
  of a stopped guest shows a constant counter sequence except for at most ONE place where it
  drops by exactly 1 (reference §7, "one moving edge"). A counter of 0 means "never stamped".
* ``counter`` mode: bytes 8..4095 of each page are zero.
* ``random`` mode: the u64 word at guest-physical address ``a`` (8-aligned, not at offset 0 of
  a page) holds ``splitmix64(a >> 3)``, i.e. ``splitmix64(pfn * 512 + word_index)``.
* a working set (``ws_mb=N``, printed as ``WORKSET <stride> <count>``): after the first pass
  the guest increments only the pages of index ``0, stride, ..., (count - 1) * stride`` in the
  ranges taken as one ascending list of pages. Those pages follow the one-moving-edge rule
  among themselves, in address order; every other page holds exactly 1 (its first stamp).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8
MODES = ("counter", "random")

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# pages per vectorised step (1 MiB): temporaries stay in cache
_CHUNK_PAGES = 256


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 output for state ``x`` (uint64 array), all arithmetic mod 2**64."""
    z = np.asarray(x, dtype=np.uint64) + _GAMMA
    t = np.empty_like(z)
    np.right_shift(z, _S30, out=t)
    z ^= t
    z *= _M1
    np.right_shift(z, _S27, out=t)
    z ^= t
    z *= _M2
    np.right_shift(z, _S31, out=t)
    z ^= t
    return z


def page_pattern(first_pfn: int, npages: int) -> np.ndarray:
    """Expected random-mode contents of ``npages`` pages starting at frame ``first_pfn``.

    Returns a ``(npages, 512)`` uint64 array; word 0 (the counter) is set to 0 and must be
    ignored by the caller. Word ``i`` of page ``pfn`` is ``splitmix64(pfn * 512 + i)``.
    """
    base = np.uint64(first_pfn * WORDS_PER_PAGE)
    idx = np.arange(npages * WORDS_PER_PAGE, dtype=np.uint64) + base
    out = splitmix64(idx).reshape(npages, WORDS_PER_PAGE)
    out[:, 0] = 0
    return out


def fill_pages(start: int, npages: int, counters: np.ndarray | int, mode: str) -> np.ndarray:
    """Build the bytes a bootguest would hold (for tests and fake guests).

    ``counters`` is one value or one per page. Returns a uint8 array of ``npages * 4096``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if start % PAGE_SIZE:
        raise ValueError(f"range start {start:#x} is not page aligned")
    if mode == "random":
        words = page_pattern(start // PAGE_SIZE, npages)
    else:
        words = np.zeros((npages, WORDS_PER_PAGE), dtype=np.uint64)
    words[:, 0] = np.asarray(counters, dtype=np.uint64)
    return words.astype("<u8", copy=False).reshape(-1).view(np.uint8)


@dataclass
class RamCheckResult:
    ok: bool
    mode: str
    pages_checked: int
    edges: int  # places where the counter drops by exactly 1
    first_counter: int | None  # counter of the first page (the "c+1" side)
    last_counter: int | None
    edge_addr: int | None  # address of the first page after the first edge
    first_bad_addr: int | None  # guest-physical address of the first bad page
    problem: str | None  # what is wrong with it (None if ok)
    bad_pages: int  # number of bad pages found (pattern errors + counter anomalies)

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise AssertionError(f"bootguest RAM check failed: {self.describe()}")

    def describe(self) -> str:
        if self.ok:
            where = f" at {self.edge_addr:#x}" if self.edge_addr is not None else ""
            return (
                f"ok: {self.pages_checked} pages ({self.mode}), {self.edges} edge(s){where}, "
                f"counters {self.first_counter}..{self.last_counter}"
            )
        return (
            f"{self.problem} (first bad page {self.first_bad_addr:#x}, {self.bad_pages} bad "
            f"page(s), {self.pages_checked} pages checked, {self.edges} edge(s))"
        )

    __str__ = describe


def _as_u8(chunk) -> np.ndarray:
    if isinstance(chunk, np.ndarray):
        return chunk.reshape(-1).view(np.uint8)
    return np.frombuffer(chunk, dtype=np.uint8)


def check_counter_pages(
    ranges: Sequence[tuple[int, int]],
    chunks: Sequence,
    mode: str = "counter",
    *,
    check_rest: bool = True,
    workset: tuple[int, int] | None = None,
) -> RamCheckResult:
    """Verify bootguest RAM.

    ``ranges``: ``[(start, end), ...]`` guest-physical, page aligned, end exclusive, as printed
    by the guest's ``RANGE`` lines. ``chunks[i]``: the ``end - start`` bytes of range ``i``
    (bytes, memoryview or numpy array). ``mode``: "counter" or "random".
    ``check_rest``: also verify bytes 8..4095 of every page (zero in counter mode, the
    splitmix64 pattern in random mode). ``workset``: ``(stride, count)`` from the guest's
    ``WORKSET`` line, or None when every page is in the sweep.
    """
    if len(ranges) != len(chunks):
        raise ValueError(f"{len(ranges)} ranges but {len(chunks)} chunks")
    data = {}
    for (s, e), chunk in zip(ranges, chunks, strict=True):
        data[s] = _as_u8(chunk)
        if data[s].size != e - s:
            raise ValueError(f"range {s:#x}..{e:#x}: got {data[s].size} bytes, want {e - s}")
    return check_counter_ranges(
        ranges, lambda start, length, s: data[s][start - s:start - s + length], mode,
        check_rest=check_rest, workset=workset)


def check_counter_ranges(
    ranges: Sequence[tuple[int, int]],
    read: Callable[[int, int, int], np.ndarray],
    mode: str = "counter",
    *,
    check_rest: bool = True,
    piece_bytes: int = 64 << 20,
    workset: tuple[int, int] | None = None,
) -> RamCheckResult:
    """check_counter_pages, reading RAM a piece at a time: ``read(start, length, range_start)``
    returns ``length`` bytes of guest-physical memory from ``start`` (inside the range that
    begins at ``range_start``). Holds at most one piece plus 8 bytes per page, so a guest of
    any size can be checked by a process much smaller than it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    prev_end = None
    for i in order:
        s, e = ranges[i]
        if s % PAGE_SIZE or e % PAGE_SIZE or e <= s:
            raise ValueError(f"bad range {s:#x}..{e:#x}")
        if prev_end is not None and s < prev_end:
            raise ValueError(f"overlapping range {s:#x}..{e:#x}")
        prev_end = e
    piece_bytes -= piece_bytes % PAGE_SIZE

    addrs_l: list[np.ndarray] = []
    counters_l: list[np.ndarray] = []
    pattern_bad: int | None = None  # first page whose bytes 8..4095 are wrong
    pattern_bad_count = 0
    for i in order:
        s, e = ranges[i]
        for ps in range(s, e, piece_bytes):
            n_bytes = min(piece_bytes, e - ps)
            data = _as_u8(read(ps, n_bytes, s))
            if data.size != n_bytes:
                raise ValueError(f"read {ps:#x}+{n_bytes:#x}: got {data.size} bytes")
            words = data.view("<u8").reshape(-1, WORDS_PER_PAGE)
            npages = words.shape[0]
            counters_l.append(words[:, 0].astype(np.uint64))
            addrs_l.append(np.arange(npages, dtype=np.uint64) * np.uint64(PAGE_SIZE)
                           + np.uint64(ps))
            if not check_rest:
                continue
            for p0 in range(0, npages, _CHUNK_PAGES):
                blk = words[p0 : p0 + _CHUNK_PAGES, 1:]
                n = blk.shape[0]
                if mode == "random":
                    bad = (blk != page_pattern(ps // PAGE_SIZE + p0, n)[:, 1:]).any(axis=1)
                else:
                    bad = blk.any(axis=1)
                nbad = int(np.count_nonzero(bad))
                if nbad:
                    pattern_bad_count += nbad
                    addr = ps + (p0 + int(np.argmax(bad))) * PAGE_SIZE
                    if pattern_bad is None or addr < pattern_bad:
                        pattern_bad = addr

    counters = np.concatenate(counters_l) if counters_l else np.zeros(0, np.uint64)
    addrs = np.concatenate(addrs_l) if addrs_l else np.zeros(0, np.uint64)
    n_all = int(counters.size)

    problems: list[tuple[int, str]] = []  # (addr, description)
    zero = counters == 0
    nzero = int(np.count_nonzero(zero))
    if nzero:
        k = int(np.argmax(zero))
        problems.append((int(addrs[k]), f"page {int(addrs[k]):#x} counter is 0 (never stamped)"))
    idle_bad = 0
    if workset is not None:
        in_set = _workset_mask(n_all, *workset)
        idle = ~in_set & ~zero & (counters != np.uint64(1))
        idle_bad = int(np.count_nonzero(idle))
        if idle_bad:
            k = int(np.argmax(idle))
            problems.append((int(addrs[k]), f"page {int(addrs[k]):#x} counter "
                                            f"{int(counters[k])} outside the working set "
                                            "(must stay 1)"))
        counters, addrs, zero = counters[in_set], addrs[in_set], zero[in_set]
    n = int(counters.size)

    edges = 0
    edge_addr = None
    anomalies = 0
    if n > 1:
        prev, cur = counters[:-1], counters[1:]
        changed = prev != cur
        drop1 = changed & (prev == cur + np.uint64(1)) & (cur != 0)
        edge_idx = np.flatnonzero(drop1)
        edges = int(edge_idx.size)
        if edges:
            edge_addr = int(addrs[edge_idx[0] + 1])
        other = changed & ~drop1 & ~zero[1:] & ~zero[:-1]
        other_idx = np.flatnonzero(other)
        anomalies = int(other_idx.size)
        bad_changes = [int(other_idx[0]) + 1] if anomalies else []
        if edges > 1:
            bad_changes.append(int(edge_idx[1]) + 1)
        if bad_changes:
            k = min(bad_changes)
            # an isolated outlier (x, y, x) is page k-1, not the page where it recovers
            if k + 1 < n and counters[k - 1] == counters[k + 1]:
                j = k
                desc = (
                    f"page {int(addrs[j]):#x} counter {int(counters[j])} between "
                    f"neighbours {int(counters[k - 1])}"
                )
            elif k >= 2 and counters[k - 2] == counters[k] and counters[k - 1] != counters[k]:
                j = k - 1
                desc = (
                    f"page {int(addrs[j]):#x} counter {int(counters[j])} between "
                    f"neighbours {int(counters[k])}"
                )
            else:
                j = k
                a, b = int(counters[k - 1]), int(counters[k])
                if b > a:
                    what = "increases"
                elif a - b == 1:
                    what = f"is a second edge (first edge at {edge_addr:#x})"
                else:
                    what = f"drops by {a - b}"
                desc = f"page {int(addrs[j]):#x} counter {b} after {a} ({what})"
            problems.append((int(addrs[j]), desc))
    if pattern_bad is not None:
        what = (
            "bytes 8..4095 differ from the splitmix64 pattern"
            if mode == "random"
            else ("bytes 8..4095 are not zero")
        )
        problems.append((pattern_bad, f"page {pattern_bad:#x}: {what}"))

    if n_all == 0:
        problems.append((0, "no pages to check"))

    first_bad = min(problems)[0] if problems else None
    problem = "; ".join(d for _, d in sorted(problems)) if problems else None
    return RamCheckResult(
        ok=not problems,
        mode=mode,
        pages_checked=n_all,
        edges=edges,
        first_counter=int(counters[0]) if n else None,
        last_counter=int(counters[-1]) if n else None,
        edge_addr=edge_addr,
        first_bad_addr=first_bad,
        problem=problem,
        bad_pages=nzero + idle_bad + anomalies + max(edges - 1, 0) + pattern_bad_count,
    )


def _workset_mask(npages: int, stride: int, count: int) -> np.ndarray:
    """Which of `npages` pages (in address order) the guest keeps incrementing."""
    if stride < 1 or count < 1 or (count - 1) * stride >= npages:
        raise ValueError(f"working set stride {stride} count {count} does not fit "
                         f"{npages} pages")
    mask = np.zeros(npages, dtype=bool)
    mask[0:count * stride:stride] = True
    return mask


def compare_with_saved(restored: RamCheckResult, exact: RamCheckResult | None,
                       at_least: int, *, ran: bool = False) -> str | None:
    """What is wrong with restored RAM against what was saved, or None. A sequence that
    passes the one-moving-edge rule is fixed by its first and last counters and its edge,
    so a paused restore must match `exact` in those; without `exact`, or once the restored
    guest `ran` (its counters only grow), no counter may be below the saved ones
    (`at_least`, or `exact`'s lowest): RAM restored zeroed or stale as a whole is
    self-consistent, and the guest re-stamping it keeps it so, but not as high."""
    if not restored.ok:
        return restored.describe()
    assert restored.last_counter is not None  # ok: pages were checked
    if exact is not None and not ran:
        want = (exact.pages_checked, exact.first_counter, exact.last_counter, exact.edge_addr)
        got = (restored.pages_checked, restored.first_counter, restored.last_counter,
               restored.edge_addr)
        if got != want:
            return (f"restored {restored.describe()}; saved {exact.describe()}")
        return None
    floor = exact.last_counter if exact is not None and exact.last_counter else at_least
    if restored.last_counter < floor:  # the lowest counter of a valid sequence
        return (f"counters {restored.first_counter}..{restored.last_counter} are below "
                f"{floor}, the lowest when the save {'ended' if exact else 'began'}")
    return None
