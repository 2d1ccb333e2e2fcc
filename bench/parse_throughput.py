"""Measure StreamDecoder throughput on a tmpfs-held stream.

    python bench/parse_throughput.py [STREAM] [--chunk-mib 8] [--synth-mib 1024]

Without STREAM a synthetic stream (header, config, RAM START, one PART holding
--synth-mib MiB of random PAGE records, END, fake device state + vmdesc) is written to
/dev/shm. The file is read in --chunk-mib chunks (``read()``, so the time includes
reading from tmpfs) and fed to the decoder; prints GB/s (1e9 bytes/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmsnap.stream import RamBlock, StreamDecoder  # noqa: E402
from vmsnap.stream import encoder as E  # noqa: E402


def synth(path: Path, mib: int, page_size: int = 4096) -> None:
    n = mib * 1024 * 1024 // page_size
    rng = np.random.default_rng(1)
    blk = RamBlock("pc.ram", n * page_size)
    with open(path, "wb") as f:
        f.write(E.header() + E.configuration("pc-q35-7.2") + E.ram_start(2, [blk]))
        f.write(E.eos() + E.footer(2) + E.section_part(2))
        step = 16384
        pages = rng.integers(0, 256, step * page_size, dtype=np.uint8)
        for i in range(0, n, step):
            k = min(step, n - i)
            offs = np.arange(i, i + k, dtype=np.uint64) * np.uint64(page_size)
            f.write(E.page_records("pc.ram", offs, pages[: k * page_size], continue_=i > 0))
        f.write(E.eos() + E.footer(2) + E.section_end(2) + E.eos() + E.footer(2))
        js = json.dumps({"page_size": page_size, "devices": []}).encode()
        f.write(b"\x04" + b"\xab" * 1000 + E.eof() + E.vmdescription(js))


def run(path: Path, chunk: int) -> tuple[float, int, int]:
    size = path.stat().st_size
    dec = StreamDecoder()
    pages = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            dec.feed(data)
            for ev in dec.events():
                if hasattr(ev, "data") and hasattr(ev, "offsets"):
                    pages += len(ev.offsets)
    dec.close()
    return time.perf_counter() - t0, size, pages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stream", nargs="?")
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--synth-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.stream:
        path = Path(a.stream)
    else:
        path = Path("/dev/shm/vmsnap-bench-stream.bin")
        synth(path, a.synth_mib)
    try:
        best = None
        for _ in range(a.repeat):
            dt, size, pages = run(path, a.chunk_mib << 20)
            print(f"{size / dt / 1e9:.2f} GB/s  ({size} bytes, {pages} pages, {dt:.3f} s, "
                  f"chunk {a.chunk_mib} MiB)")
            best = dt if best is None else min(best, dt)
        print(f"best: {size / best / 1e9:.2f} GB/s")
    finally:
        if not a.stream:
            os.unlink(path)


if __name__ == "__main__":
    main()
