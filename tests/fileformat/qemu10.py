"""Helper: make QEMU 10 (chroot build/qemu10-root) write a mapped-ram file."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "build" / "qemu10-root"


def available() -> bool:
    return (ROOT / "usr/bin/qemu-system-x86_64").exists() and os.geteuid() == 0


async def _drive(sock: str, uri: str, caps: list[str]) -> None:
    from qemu.qmp import QMPClient

    qmp = QMPClient("vmsnap-test")
    for _ in range(200):
        try:
            await qmp.connect(sock)
            break
        except Exception:  # noqa: BLE001
            await asyncio.sleep(0.05)
    else:
        raise RuntimeError("cannot connect to QMP")
    try:
        await qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": c, "state": True} for c in caps]},
        )
        await qmp.execute("migrate", {"uri": uri})
        for _ in range(1200):
            st = await qmp.execute("query-migrate")
            if st.get("status") == "completed":
                return
            if st.get("status") == "failed":
                raise RuntimeError(f"migration failed: {st}")
            await asyncio.sleep(0.05)
        raise RuntimeError("migration timeout")
    finally:
        try:
            await qmp.execute("quit")
        except Exception:  # noqa: BLE001
            pass
        try:
            await qmp.disconnect()
        except (EOFError, OSError):  # QEMU closed the socket after quit
            pass


def make_mapped_ram_file(dest: Path, mem_mb: int = 128, tag: str = "t") -> Path:
    """Run QEMU 10 paused, migrate to a mapped-ram file, copy it to `dest`."""
    tmpdir = ROOT / "tmp" / f"vmsnap-{os.getpid()}-{tag}"
    tmpdir.mkdir(parents=True, exist_ok=True)
    inner = "/" + str(tmpdir.relative_to(ROOT))
    sock = f"{inner}/q.sock"
    img = f"{inner}/x.img"
    proc = subprocess.Popen(
        [
            "chroot", str(ROOT), "qemu-system-x86_64", "-machine", "q35", "-m", str(mem_mb),
            "-nodefaults", "-display", "none", "-accel", "tcg", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        t0 = time.monotonic()
        while not (tmpdir / "q.sock").exists():
            if proc.poll() is not None or time.monotonic() - t0 > 30:
                raise RuntimeError(f"qemu did not start: {proc.stderr.read()!r}")
            time.sleep(0.05)
        asyncio.run(_drive(str(tmpdir / "q.sock"), f"file:{img}", ["mapped-ram"]))
        proc.wait(timeout=30)
        shutil.move(tmpdir / "x.img", dest)
        return dest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
