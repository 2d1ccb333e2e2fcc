"""The device-state walk that tells a whole vmdesc-less stream from one cut short."""

from __future__ import annotations

import struct
import time

from hypothesis import assume, given
from hypothesis import strategies as st

from vmsnap.stream import encoder as E
from vmsnap.stream.sections import ends_at_eof

BE32 = struct.Struct(">I")


def full(sid: int, idstr: str, body: bytes) -> bytes:
    return (bytes([0x04]) + BE32.pack(sid) + E.counted(idstr) + BE32.pack(0) + BE32.pack(1)
            + body + E.footer(sid))


sections = st.lists(
    st.tuples(st.integers(0, 60), st.sampled_from(["timer", "cpu", "apic", "kvmclock"]),
              st.binary(max_size=200)),
    min_size=1, max_size=6)


@given(sections)
def test_whole_device_state_ends_at_eof(secs):
    data = b"".join(full(*s) for s in secs) + E.eof()
    assert ends_at_eof(data)


@given(sections, st.data())
def test_every_cut_is_refused(secs, data):
    whole = b"".join(full(*s) for s in secs) + E.eof()
    # a body holding its own section's footer followed by 00 is the one ambiguity left
    assume(not any(E.footer(sid) in body for sid, _, body in secs))
    cut = data.draw(st.integers(1, len(whole) - 1))
    assert not ends_at_eof(whole[:cut])


def test_false_footer_of_another_section_is_refused():
    """A register value reading `7e 00 00 00 07 00` inside the cpu section (id 5): the old
    last-six-bytes check took a file cut right after it for a whole stream."""
    cpu_body = bytes(40) + b"\x7e" + BE32.pack(7) + b"\x00" + bytes(40)
    whole = full(0, "timer", bytes(16)) + full(5, "cpu", cpu_body) + E.eof()
    assert ends_at_eof(whole)
    cut = whole.index(b"\x7e" + BE32.pack(7)) + 6
    assert whole[cut - 1] == 0 and not ends_at_eof(whole[:cut])


def test_hostile_repetition_stays_bounded():
    """Thousands of headers, each with footers of its id everywhere after it: the walk gives
    up within its budget instead of going quadratic."""
    unit = bytes([0x04]) + BE32.pack(1) + E.counted("x") + bytes(8) + E.footer(1)
    data = unit * 20000 + b"\x01"  # never ends at EOF: every path is explored or budgeted
    data = data[:-1] + b"\x00" + b"\x00"
    t = time.perf_counter()
    ends_at_eof(data)
    assert time.perf_counter() - t < 2.0


def test_no_eof_byte():
    assert not ends_at_eof(b"")
    assert not ends_at_eof(full(0, "timer", b"") + b"\x01")
