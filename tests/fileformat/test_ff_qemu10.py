"""Check layout and reader against a real mapped-ram file written by QEMU 10."""

import os

import numpy as np
import pytest
import streambytes

from testbed.capture import capture
from vmsnap.fileformat import SnapshotWriter, TrailerMetadata, compute_layout, open_snapshot

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def qemu_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("q10") / "native.img"
    return capture(out, qemu="10", memory_mb=128, mapped_ram=True)


def test_reader_parses_native(qemu_file):
    with open_snapshot(qemu_file) as s:
        assert s.native and s.metadata is None
        assert s.machine_type.startswith("pc-q35-")
        assert "mapped-ram" in s.stream.capabilities
        names = [b.name for b in s.blocks]
        assert names[0] == "pc.ram" and "pc.bios" in names
        assert s.blocks[0].used_length == 128 << 20
        assert s.stream_end == os.path.getsize(qemu_file)
        assert s.tail[:8] == (0x10).to_bytes(8, "big")
        bios = s.block("pc.bios")
        assert bios.present_count > 0  # firmware is loaded
        runs = s.present_runs(bios)
        mv = s.read_pages(bios, int(runs[0][0]), int(runs[0][1]))
        raw = open(qemu_file, "rb")
        raw.seek(bios.pages_offset + int(runs[0][0]) * 4096)
        assert bytes(mv) == raw.read(len(mv))


def test_layout_reproduces_qemu(qemu_file):
    with open_snapshot(qemu_file) as s:
        lay = compute_layout([(b.name, b.used_length) for b in s.blocks],
                             s.stream.first_block_offset)
        for mine, real in zip(lay.blocks, s.blocks, strict=True):
            assert mine.idstr_offset == real.idstr_offset
            assert mine.header_offset == real.header_offset
            assert mine.header == real.header  # version, page size, bitmap/pages offsets
        assert lay.tail_offset == s.tail_offset
        raw = open(qemu_file, "rb").read(lay.blocks[0].header_offset + 28)
        assert raw[lay.blocks[0].idstr_offset:] == lay.blocks[0].record()


def test_rewrite_native_as_vmsnap(qemu_file, tmp_path):
    """Copy QEMU's file through SnapshotWriter: identical stream bytes + trailer."""
    out = tmp_path / "copy.vms"
    with open_snapshot(qemu_file) as s:
        w = SnapshotWriter(out, TrailerMetadata(machine_type=s.machine_type))
        w.begin(s.header_bytes, [(b.name, b.used_length) for b in s.blocks])
        for b in s.blocks:
            for first, count in s.present_runs(b):
                data = s.read_pages(b, int(first), int(count))
                offs = (np.arange(first, first + count, dtype=np.uint64)) * 4096
                w.write_pages(b.name, offs, data)
        w.finish(s.tail)
    with open_snapshot(out) as c:
        c.verify()
        end = c.stream_end
    assert end == os.path.getsize(qemu_file)
    a = open(qemu_file, "rb").read()
    b = open(out, "rb").read(end)
    assert a == b
    assert streambytes  # helper module importable alongside
