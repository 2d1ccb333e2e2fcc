"""Capture real QEMU migration streams (test helper; does I/O, not part of the codec)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

REPO = Path(__file__).resolve().parents[2]
CHROOT = REPO / "build" / "qemu10-root"


async def _drive(sock: str, uri: str, caps: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise TimeoutError(f"QMP socket {sock} never appeared")
        await asyncio.sleep(0.02)
    while True:
        qmp = QMPClient("vmsnap-capture")
        try:
            await qmp.connect(sock)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        if caps:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": True} for c in caps]},
            )
        await qmp.execute("migrate", {"uri": uri})
        while True:
            st = await qmp.execute("query-migrate")
            status = st.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration {status}: {st}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration did not complete: {st}")
            await asyncio.sleep(0.05)
    finally:
        try:
            await qmp.execute("quit")
        except Exception:
            pass  # QEMU may close the socket before answering
        try:
            await qmp.disconnect()
        except Exception:
            pass


def capture(
    out: Path,
    *,
    qemu10: bool = False,
    machine: str = "q35",
    mem_mb: int = 128,
    mapped_ram: bool = False,
    caps: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> Path:
    """Run a paused QEMU (-S, no guest) and migrate it to ``out``.

    ``qemu10`` runs QEMU 10 from the chroot ``build/qemu10-root``; the socket and
    output file live inside the chroot's /tmp and are moved to ``out`` afterwards.
    ``mapped_ram`` uses ``file:`` with the mapped-ram capability, else ``exec:cat``.
    """
    caps_l = list(caps) + (["mapped-ram"] if mapped_ram else [])
    if qemu10:
        if not (CHROOT / "usr/bin/qemu-system-x86_64").exists():
            raise FileNotFoundError(f"QEMU 10 chroot missing: {CHROOT}")
        host_tmp = Path(tempfile.mkdtemp(prefix="vmsnap-cap-", dir=CHROOT / "tmp"))
        inner_tmp = "/tmp/" + host_tmp.name
        prefix = ["chroot", str(CHROOT)]
        accel = "tcg"
    else:
        host_tmp = Path(tempfile.mkdtemp(prefix="vmsnap-cap-"))
        inner_tmp = str(host_tmp)
        prefix = []
        accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    sock_host = host_tmp / "qmp.sock"
    file_host = host_tmp / "stream.bin"
    file_inner = inner_tmp + "/stream.bin"
    uri = f"file:{file_inner}" if mapped_ram else f"exec:cat > {file_inner}"
    cmd = prefix + [
        "qemu-system-x86_64",
        "-machine", machine,
        "-m", str(mem_mb),
        "-nodefaults",
        "-display", "none",
        "-accel", accel,
        "-S",
        "-qmp", f"unix:{inner_tmp}/qmp.sock,server=on,wait=off",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        asyncio.run(_drive(str(sock_host), uri, caps_l, timeout))
        proc.wait(timeout=timeout)
    except BaseException as exc:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"capture failed ({' '.join(cmd)}): {exc!r}; stderr: {err!r}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(file_host), str(out))
    shutil.rmtree(host_tmp, ignore_errors=True)
    return out
