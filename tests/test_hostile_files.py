"""Issue 11 item 8: hostile sparse files cannot exhaust memory. Crafted from a real file (QEMU
7.2, 128 MiB, imported by vmsnap) with consistent layouts and re-sealed trailers, run through
the CLI under a 1 GiB address-space limit; plus the trailer fuzz under the same limit."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cli import one_line
from testbed.craft import grow_last_block, reseal, sparse_copy, trailer_parts, write_trailer
from testbed.transfer import VMSNAP
from vmsnap.fileformat.trailer import COMMIT_SIZE, MAX_METADATA, CommitRecord

pytestmark = pytest.mark.qemu

ADDRESS_SPACE = 1 << 30
TIB = 1 << 40


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def vmsnap_limited(*args) -> subprocess.CompletedProcess:
    """The vmsnap CLI with at most 1 GiB of address space."""
    return subprocess.run([VMSNAP, *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit)


@pytest.fixture
def snap(small_snapshot) -> Path:
    return small_snapshot


def test_big_sparse_block_still_verifies(snap, tmp_path):
    """Control: a last block grown to 1 GiB (holes) is a valid file; it verifies within the
    limit, so the refusals below are about size, not about the crafting."""
    big = grow_last_block(snap, tmp_path / "big.vms", 1 << 30)
    result = vmsnap_limited("verify", big)
    assert result.returncode == 0, result.stderr
    info = json.loads(vmsnap_limited("info", "--json", big).stdout)
    assert info["ram_bytes"] > 1 << 30


@pytest.fixture(scope="module")
def huge(small_snapshot, tmp_path_factory) -> Path:
    """The issue's case: the last block claims 8 TiB in a file of ~130 MB on disk."""
    big = grow_last_block(small_snapshot, tmp_path_factory.mktemp("huge") / "huge.vms",
                          8 * TIB)
    assert big.stat().st_size > 8 * TIB and big.stat().st_blocks * 512 < 200 << 20
    return big


@pytest.mark.parametrize("verb", ["verify", "info", "send"])
def test_8tib_block_in_small_file_refused(huge, verb):
    big = huge
    line = one_line(vmsnap_limited(verb, big) if verb != "send" else
                    subprocess.run([VMSNAP, "send", str(big)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, preexec_fn=_limit))
    assert "claim" in line and "8,796," in line, line


def test_commit_record_claiming_40gib_body_refused(snap, tmp_path):
    """A commit record whose body is 40 GiB long (the file is extended sparse to match)."""
    f = sparse_copy(snap, tmp_path / "body.vms")
    body_offset, stream_end, _md, _tables = trailer_parts(f)
    claimed = 40 << 30
    record = CommitRecord(1, body_offset, claimed, 0, stream_end).pack()
    with open(f, "r+b") as fh:
        fh.truncate(body_offset + claimed)
        fh.seek(body_offset + claimed)
        fh.write(record)
    for verb in ("verify", "info"):
        line = one_line(vmsnap_limited(verb, f))
        assert "body of" in line and str(claimed) in line, line


def test_metadata_length_field_of_512mib_refused(snap, tmp_path):
    """The JSON length field says 512 MiB (the body is sealed as it is)."""
    f = sparse_copy(snap, tmp_path / "jlen.vms")
    body_offset, stream_end, md, tables = trailer_parts(f)
    js = json.dumps(md, separators=(",", ":"), sort_keys=True).encode()
    write_trailer(f, body_offset, stream_end, js, tables, jlen=512 << 20)
    line = one_line(vmsnap_limited("verify", f))
    assert "metadata" in line and "exceeds" in line, line


def test_metadata_over_the_cap_refused_under_it_accepted(snap, tmp_path):
    """Real JSON padded past the 16 MiB cap is refused; padded to half of it, the same file
    verifies (the cap is a sanity limit, not a tight one)."""
    over = sparse_copy(snap, tmp_path / "over.vms")
    reseal(over, lambda md: md.setdefault("extra", {}).update(pad="x" * (MAX_METADATA + 1)))
    line = one_line(vmsnap_limited("verify", over))
    assert "exceeds" in line or "larger than the metadata" in line, line
    under = sparse_copy(snap, tmp_path / "under.vms")
    reseal(under, lambda md: md.setdefault("extra", {}).update(pad="x" * (MAX_METADATA // 2)))
    result = vmsnap_limited("verify", under)
    assert result.returncode == 0, result.stderr


def test_checksum_table_claiming_huge_count_refused(snap, tmp_path):
    """A block entry claims 2^40 checksums: refused before anything that size is made."""
    f = sparse_copy(snap, tmp_path / "pages.vms")
    reseal(f, lambda md: md["blocks"][0].update(pages=1 << 40))
    line = one_line(vmsnap_limited("verify", f))
    assert "beyond body" in line, line


def test_fuzz_trailer_under_address_space_limit():
    """testbed.fuzz_trailer: 300 hypothesis examples under RLIMIT_AS 1 GiB."""
    result = subprocess.run([sys.executable, "-m", "testbed.fuzz_trailer", "300"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_commit_record_layout():
    """The crafted 40 GiB record above relies on this layout (guards the test itself)."""
    rec = CommitRecord(1, 4096, 10, 0, 100).pack()
    assert len(rec) == COMMIT_SIZE and struct.unpack_from("<Q", rec, 24)[0] == 10
