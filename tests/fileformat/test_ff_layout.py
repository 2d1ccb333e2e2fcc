import struct

import numpy as np

from vmsnap.fileformat import (
    MappedRamHeader,
    bitmap_size,
    compute_layout,
    contiguous_runs,
    pack_bitmap,
    runs,
    unpack_bitmap,
)
from vmsnap.fileformat.bitmap import count_set

Q35_256 = [
    ("pc.ram", 0x10000000),
    ("/rom@etc/acpi/tables", 0x20000),
    ("pc.bios", 0x40000),
    ("pc.rom", 0x20000),
    ("/rom@etc/table-loader", 0x1000),
    ("/rom@etc/acpi/rsdp", 0x1000),
]


def test_reference_numbers_256m_q35():
    # pc.ram idstr at 0x60 so that its header is at 0x6f (reference §5.2)
    lay = compute_layout(Q35_256, 0x60)
    pc = lay.blocks[0]
    assert pc.header_offset == 0x6F
    assert pc.bitmap_offset == 0x8B
    assert pc.bitmap_offset + pc.bitmap_size == 0x208B
    assert pc.pages_offset == 0x100000
    nxt = lay.blocks[1]
    assert nxt.idstr_offset == 0x10100000
    assert nxt.header_offset == 0x1010001D
    assert nxt.bitmap_offset == 0x10100039
    assert nxt.pages_offset == 0x10200000
    assert lay.blocks[-1].pages_offset == 0x10600000
    assert lay.tail_offset == 0x10601000
    rec = pc.record()
    assert rec[:7] == b"\x06pc.ram" and struct.unpack(">Q", rec[7:15])[0] == 0x10000000
    assert MappedRamHeader.parse(rec[15:]) == pc.header
    assert MappedRamHeader.parse(rec, 15).pack() == rec[15:]
    assert pc.ram_block.header_offset == pc.header_offset
    assert pc.ram_block.resume_offset == pc.end


def test_bitmap_roundtrip_and_runs():
    rng = np.random.default_rng(0)
    for n in (1, 63, 64, 65, 1000, 65536):
        p = rng.random(n) < 0.3
        data = pack_bitmap(p)
        assert len(data) == bitmap_size(n)
        words = np.frombuffer(data, "<u8")
        for i in map(int, np.flatnonzero(p)[:50]):
            assert (int(words[i // 64]) >> (i % 64)) & 1
        assert (unpack_bitmap(data, n) == p).all()
        assert count_set(data, n) == int(p.sum())
        assert count_set(b"\xff" * len(data), n) == n  # bits past n are not counted
        r = runs(p)
        q = np.zeros(n, bool)
        for a, c in r:
            q[a:a + c] = True
        assert (q == p).all()
        r2 = runs(p, max_pages=3)
        assert (r2[:, 1] <= 3).all() and r2[:, 1].sum() == p.sum()
    assert runs(np.zeros(5, bool)).shape == (0, 2)
    assert contiguous_runs(np.array([3, 4, 5, 9, 10, 2])).tolist() == [[0, 3], [3, 2], [5, 1]]
