import streambytes
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.fileformat import SnapshotError, compute_layout
from vmsnap.fileformat.prefix import parse_prefix, stream_looks_complete

BLOCKS = [("pc.ram", 1 << 20), ("pc.bios", 0x2000)]


def image():
    pre = streambytes.prefix("pc-q35-10.0", BLOCKS)
    lay = compute_layout(BLOCKS, len(pre))
    img = bytearray(lay.tail_offset)
    img[: len(pre)] = pre
    for b in lay.blocks:
        img[b.idstr_offset:b.header_offset + 28] = b.record()
    return bytes(img) + streambytes.tail(), lay


def parse(data: bytes):
    return parse_prefix(lambda o, n: data[o:o + n], len(data))


def test_parse_synthetic():
    img, lay = image()
    p = parse(img)
    assert p.machine_type == "pc-q35-10.0" and p.ram_section_id == 1
    assert [(b.name, b.header) for b in p.blocks] == [(b.name, b.header) for b in lay.blocks]
    assert p.tail_offset == lay.tail_offset
    assert stream_looks_complete(img[p.tail_offset:])
    assert not stream_looks_complete(img[p.tail_offset:-1])


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_random_bytes(data):
    try:
        parse(data)
    except SnapshotError:
        pass
    stream_looks_complete(data)


_IMG = image()[0]


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(_IMG)))
@settings(max_examples=400)
def test_mutated_prefix(muts, cut):
    img = bytearray(_IMG)
    for i, v in muts:
        img[i] = v
    try:
        parse(bytes(img[:cut]))
    except SnapshotError:
        pass
