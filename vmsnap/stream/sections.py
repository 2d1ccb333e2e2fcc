"""Whether a stream's device state, opaque to the codec, ends where QEMU's stream may end.

With a vmdesc trailer the end is unmistakable (`00 06 be32(L) JSON` of exactly L bytes). A
machine with ``suppress-vmdesc=on`` ends with a bare EOF byte after a section footer, and
device bytes hold ``7e .. .. .. .. 00`` by chance (a register value): a file cut there would
pass for a whole one by its last six bytes. QEMU writes the device state as sections
(header, opaque body, footer naming the same section id); :func:`ends_at_eof` accepts only if
some chain of such sections, from the first byte, ends with EOF at the last byte.
"""

from __future__ import annotations

from .constants import (
    QEMU_VM_EOF,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
)

#: Footer candidates looked at in all before giving up (a real stream needs about one per
#: section; a hostile one must not make the walk quadratic).
SEARCH_BUDGET = 1 << 16


def _body_start(data: bytes, p: int) -> int | None:
    """Offset after the header of a section starting at `p` (END: type, id; FULL: type, id,
    idstr, instance, version), or None if no section header is there."""
    t = data[p]
    if t == QEMU_VM_SECTION_END:
        return p + 5 if p + 5 <= len(data) else None
    if t != QEMU_VM_SECTION_FULL or p + 6 > len(data):
        return None
    n = data[p + 5]
    end = p + 6 + n + 8
    idstr = data[p + 6:p + 6 + n]
    if n == 0 or end > len(data) or not all(0x20 < c < 0x7f for c in idstr):
        return None
    return end


def ends_at_eof(data: bytes) -> bool:
    """True if `data` (device state, from the first section header to the end) reads as
    sections, each closed by its own footer, then one EOF byte and nothing after it."""
    n = len(data)
    if not n or data[-1] != QEMU_VM_EOF:
        return False
    # depth-first over (next footer search position, footer pattern); earliest footer first
    stack: list[tuple[int, bytes]] = []
    seen: set[int] = set()

    def enter(p: int) -> bool:
        if p in seen or p >= n:
            return False
        seen.add(p)
        if p == n - 1:
            return True  # data[-1] is EOF
        body = _body_start(data, p)
        if body is not None:
            stack.append((body, bytes([QEMU_VM_SECTION_FOOTER]) + data[p + 1:p + 5]))
        return False

    if enter(0):
        return True
    budget = SEARCH_BUDGET
    while stack and budget:
        budget -= 1
        start, footer = stack.pop()
        q = data.find(footer, start)
        if q < 0:
            continue
        stack.append((q + 1, footer))  # a later footer of the same section, if this fails
        if enter(q + 5):
            return True
    return False


__all__ = ["ends_at_eof", "SEARCH_BUDGET"]
