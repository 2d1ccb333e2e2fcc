"""Fuzz the vmsnap trailer (commit record, body, metadata JSON) under an address-space limit.

Run as `python -m testbed.fuzz_trailer [EXAMPLES]`: sets RLIMIT_AS to 1 GiB, then lets
hypothesis build sealed trailers (valid checksums, so decoding gets past them) with hostile
sizes: stream ends up to 1 PiB, commit records claiming huge bodies, JSON length fields and
checksum-table counts far beyond the bytes present, ranges past the stream. The file is
simulated sparse: zeros everywhere but the trailer. Every input must end in a SnapshotError
or a decoded trailer, and no read may be larger than the metadata cap plus the checksums of
the present pages the reader knows from the bitmaps. Exit status 0 when all examples pass.
"""

from __future__ import annotations

import json
import resource
import struct
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsnap.fileformat.errors import SnapshotError
from vmsnap.fileformat.trailer import (
    COMMIT_SIZE,
    MAX_METADATA,
    read_body,
    read_commit,
    xxh3,
)
from vmsnap.hostkey import trust_of

ADDRESS_SPACE = 1 << 30
HUGE = st.integers(0, 1 << 50)

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)

metadata = st.fixed_dictionaries({
    "format_version": st.sampled_from([1, 1, 1, 2, "1"]),
    "checksum": st.sampled_from(["xxh3-64", "xxh3-64", "md5"]),
    "page_size": st.sampled_from([4096, 4096, 0, -1, 1 << 40]),
    "created": st.sampled_from(["2026-01-01T00:00:00Z", 5]),
    "command_line": st.none() | st.lists(st.text(max_size=30), max_size=5) | json_value,
    "blocks": st.lists(st.fixed_dictionaries({"name": st.text(max_size=10) | json_value,
                                              "pages": HUGE | json_value}), max_size=4),
    "ranges": st.lists(st.fixed_dictionaries({
        "start": HUGE, "length": HUGE,
        "xxh3": st.sampled_from(["0123456789abcdef", "zz", "1"])}), max_size=4),
}, optional={"extra": json_value, "signature": json_value,
             "qemu_version": json_value, "machine_type": json_value})


@st.composite
def sparse_files(draw):
    """(file size, {offset: bytes}, present pages the reader would know)."""
    stream_end = draw(HUGE)
    md = draw(metadata)
    md["stream_end"] = draw(st.sampled_from([stream_end, stream_end + 1]))
    js = json.dumps(md).encode()
    jlen = draw(st.sampled_from([len(js), len(js)]) | st.integers(0, (1 << 32) - 1))
    tables = draw(st.binary(max_size=256))
    head = struct.pack("<8sII", draw(st.sampled_from([b"VMSNAPT1", b"VMSNAPT2"])), 1, jlen)
    body = head + js + b"\0" * (-(len(head) + len(js)) % 8) + tables
    offset = -(-stream_end // 4096) * 4096
    claimed = draw(st.sampled_from([len(body)]) | HUGE)
    record = struct.pack("<8sIIQQQQQ", b"VMSNAPC1", 1, 0, offset, claimed, xxh3(body),
                         stream_end, 0)
    record += struct.pack("<Q", xxh3(record))
    size = offset + claimed + COMMIT_SIZE
    return size, {offset: body, size - COMMIT_SIZE: record}, draw(st.integers(0, 1 << 20))


def pread_of(size: int, regions: dict[int, bytes], limit: int):
    def pread(off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > size:
            raise SnapshotError("read beyond end of file")
        assert n <= limit, f"read of {n} bytes (limit {limit})"
        out = bytearray(n)
        for start, data in regions.items():
            lo, hi = max(off, start), min(off + n, start + len(data))
            if lo < hi:
                out[lo - off:hi - off] = data[lo - start:hi - start]
        return bytes(out)
    return pread


def check(size: int, regions: dict[int, bytes], present: int) -> None:
    pread = pread_of(size, regions, MAX_METADATA + 64 + 8 * present)
    try:
        trailer = read_body(pread, read_commit(pread, size), present)
    except SnapshotError:
        return
    trust_of(trailer)  # a decoded trailer can be judged without error


def main(examples: int) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(sparse_files())
    def fuzz(case: tuple[int, dict[int, bytes], int]) -> None:
        check(*case)

    fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
