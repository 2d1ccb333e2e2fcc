"""The file's stream read through the codec (vmsnap.fileformat.prefix.StreamScan)."""

import pytest
import streambytes
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.fileformat import SnapshotError, compute_layout
from vmsnap.fileformat.prefix import StreamScan, parse_prefix

BLOCKS = [("pc.ram", 1 << 20), ("pc.bios", 0x2000)]


def image(blocks=BLOCKS, tail=None, caps=("mapped-ram",)):
    pre = streambytes.prefix("pc-q35-10.0", blocks, caps=caps)
    lay = compute_layout(blocks, len(pre))
    img = bytearray(lay.tail_offset)
    img[: len(pre)] = pre
    for b in lay.blocks:
        img[b.idstr_offset:b.header_offset + 28] = b.record()
    return bytes(img) + (streambytes.tail() if tail is None else tail), lay


def scan(data: bytes) -> StreamScan:
    return StreamScan(lambda o, n: data[o:o + n], len(data))


def parse(data: bytes):
    return parse_prefix(lambda o, n: data[o:o + n], len(data))


def tail_problem(data: bytes):
    s = scan(data)
    return s.tail_problem(data[s.prefix.tail_offset:])


def error(data: bytes) -> str:
    with pytest.raises(SnapshotError) as ei:
        parse(data)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_parse_synthetic():
    img, lay = image()
    p = parse(img)
    assert p.machine_type == "pc-q35-10.0" and p.ram_section_id == 1
    assert p.capabilities == ("mapped-ram",)
    assert p.first_block_offset == lay.start
    assert p.total_ram == sum(n for _, n in BLOCKS)
    assert list(p.blocks) == [b.ram_block for b in lay.blocks]
    assert [(b.stream_offset, b.header_offset) for b in p.blocks] == \
        [(b.idstr_offset, b.header_offset) for b in lay.blocks]
    assert p.tail_offset == lay.tail_offset
    assert tail_problem(img) is None


def test_reads_only_headers():
    """Page areas are jumped over: no pread touches them (beyond the chunk read at an entry)."""
    img, lay = image([("pc.ram", 64 << 20), ("pc.bios", 0x40000)])
    seen = []

    def pread(o, n):
        seen.append((o, n))
        return img[o:o + n]

    StreamScan(pread, len(img))
    assert sum(n for _, n in seen) < 64 << 10
    assert [o for o, _ in seen] == [0, lay.blocks[0].end]


def test_tail_problems():
    img, _ = image()
    assert "EOF" in tail_problem(img[:-1])  # cut inside the vmdesc
    assert "vmdesc" in tail_problem(img + b"\0")
    assert "device" in tail_problem(img + b"\x01garbage")
    no_vmdesc, _ = image(tail=streambytes.tail(device_state=b"", vmdesc=False))
    assert tail_problem(no_vmdesc) is None  # footer, EOF: vmdesc suppressed
    odd, _ = image(tail=streambytes.tail(device_state=b"\x04x", vmdesc=False))
    assert "vmdesc" in tail_problem(odd)


def test_error_messages():
    img, lay = image()
    assert "bad magic" in error(b"XXXX" + img[4:]) and "offset 0x0" in error(b"XXXX" + img[4:])
    msg = error(img[:40])
    assert "truncated" in msg
    pc, bios = lay.blocks
    msg = error(img[:pc.bitmap_offset + 100])
    assert "truncated" in msg and "'pc.ram'" in msg and "beyond end of file" in msg
    msg = error(img[:bios.header_offset + 28 + 10])
    assert "truncated" in msg and "'pc.bios'" in msg
    assert "mapped-ram" in error(image(caps=())[0])
    bad = bytearray(img)
    bad[pc.header_offset + 3] = 2  # header version
    msg = error(bytes(bad))
    assert "version 2" in msg and f"offset {pc.header_offset:#x}" in msg
    assert error(b"") and error(img[:3])


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_random_bytes(data):
    try:
        s = scan(data)
    except SnapshotError:
        return
    s.tail_problem(data[s.prefix.tail_offset:])


_IMG = image()[0]


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(_IMG)))
@settings(max_examples=400)
def test_mutated_prefix(muts, cut):
    img = bytearray(_IMG)
    for i, v in muts:
        img[i] = v
    data = bytes(img[:cut])
    try:
        s = scan(data)
    except SnapshotError:
        return
    assert isinstance(s.tail_problem(data[s.prefix.tail_offset:]), str | None)


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_random_tail(tail):
    img, _ = image(tail=b"")
    data = img + tail
    assert isinstance(tail_problem(data), str | None)
