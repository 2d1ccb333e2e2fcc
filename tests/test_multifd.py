"""Multifd save (receive_multifd) and restore (send_multifd): synthetic epoch-ordering tests
and real QEMU round trips (7.2 host, 10 chroot with pc-q35-7.2 and default q35)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.guests import BootGuest
from testbed.qemu import Vm
from vmsnap.fileformat.reader import open_snapshot
from vmsnap.fileformat.writer import SnapshotWriter
from vmsnap.ops.destination import PER_ROUND, PER_SECTION, destination, sync_mode_for_machine
from vmsnap.ops.multifd_receive import identify_channels, receive_multifd
from vmsnap.ops.multifd_send import send_multifd
from vmsnap.stream import RamBlock, StreamError
from vmsnap.stream import encoder as E
from vmsnap.stream.constants import MULTIFD_FLAG_SYNC
from vmsnap.stream.multifd import MultifdInit, PacketHeader

PS = 4096
VMDESC = json.dumps({"page_size": PS, "devices": [{"name": "x"}]}).encode()


# -- pure: sync mode from the destination machine type ------------------------------------
@pytest.mark.parametrize(("machine", "mode"), [
    ("pc-q35-7.2", PER_SECTION), ("pc-i440fx-8.0", PER_SECTION), ("pc-q35-8.1", PER_ROUND),
    ("pc-q35-10.1-machine", PER_ROUND), ("pc-i440fx-2.12", PER_SECTION),
    ("pc-q35-9.0", PER_ROUND), ("virt-8.0", PER_SECTION)])
def test_sync_mode_for_machine(machine, mode):
    assert sync_mode_for_machine(machine) == mode


@pytest.mark.parametrize("alias", ["q35", "pc", "microvm", ""])
def test_sync_mode_needs_resolved_machine(alias):
    with pytest.raises(ValueError):
        sync_mode_for_machine(alias)


# -- synthetic epoch ordering ----------------------------------------------------------------
BLOCK = "pc.ram"
NPAGES = 32


def _page(value: int) -> bytes:
    return bytes([value]) * PS


def _packet(pages: dict[int, int], num: int, sync: bool = False) -> bytes:
    offs = np.array(sorted(pages), np.uint64) * np.uint64(PS)
    hdr = PacketHeader.make(BLOCK, offs, packet_num=num, flags=MULTIFD_FLAG_SYNC if sync else 0)
    return hdr.pack() + b"".join(_page(pages[p]) for p in sorted(pages))


def _sync(num: int) -> bytes:
    return PacketHeader.make("", [], packet_num=num, flags=MULTIFD_FLAG_SYNC).pack()


def _main_stream(per_round: bool, zero_in_end: list[int]) -> bytes:
    sid = 2
    mark = E.multifd_flush() if per_round else b""
    out = E.header() + E.configuration("pc-q35-7.2", ())
    out += E.ram_start(sid, [RamBlock(BLOCK, NPAGES * PS)]) + mark + E.eos() + E.footer(sid)
    out += E.section_part(sid) + mark + E.eos() + E.footer(sid)  # epoch 1 closes here
    out += E.section_end(sid)
    if zero_in_end:
        out += E.zero_records(BLOCK, np.array(zero_in_end, np.uint64) * np.uint64(PS))
    out += mark + E.eos() + E.footer(sid)  # epoch 2 closes here
    out += b"\x04\x00\x00\x00\x07\x05timer" + bytes(range(40)) + E.footer(7)
    return out + E.eof() + E.vmdescription(VMDESC)


def _feeder(sock, parts, sent: threading.Event | None = None):
    """Send `parts` on `sock` in a thread, then close it and set `sent`. A part that is an
    Event is waited for (another feeder's `sent`): a deterministic "this channel is late"."""
    def run():
        try:
            for p in parts:
                if isinstance(p, threading.Event):
                    assert p.wait(30), "the other channel never finished sending"
                else:
                    sock.sendall(p)
        finally:
            sock.close()
            if sent is not None:
                sent.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("per_round", [False, True], ids=["per-section", "per-round"])
def test_epoch_ordering_later_epoch_wins(tmp_path, per_round):
    """Page 3: v1 on channel 0 in epoch 1 (sent late), v2 on channel 1 in epoch 2 (sent at
    once) → v2. Page 4: non-zero on channel 0 in epoch 1, ZERO on main in epoch 2 → absent.
    Page 6 sent twice inside epoch 1 on both channels (7.2 duplicate quirk) → present.
    Channel 0's SYNC rides on a data packet (7.2 quirk)."""
    main_a, main_b = socket.socketpair()
    ch = [socket.socketpair() for _ in range(2)]
    uuid = bytes(16)
    c1_sent = threading.Event()
    c0 = [MultifdInit(uuid, 0).pack(), _sync(1), c1_sent,  # late: channel 1 waits for us
          _packet({3: 0x11, 4: 0x44, 6: 0x66}, 3), _packet({7: 0x77}, 5, sync=True),
          _sync(8)]
    # 7.2 quirk: SYNC riding on a data packet, followed by an empty packet
    c1 = [MultifdInit(uuid, 1).pack(), _sync(2), _packet({6: 0x66, 8: 0x88}, 4), _sync(6),
          _packet({3: 0x22}, 7), _sync(9)]
    threads = [_feeder(ch[0][0], c0), _feeder(ch[1][0], c1, c1_sent),
               _feeder(main_a, [_main_stream(per_round, [4])])]
    path = tmp_path / "snap"
    stats = receive_multifd(main_b, [ch[1][1], ch[0][1]], SnapshotWriter(path))
    for t in threads:
        t.join()
    assert stats.sync_mode == ("per-round" if per_round else "per-section")
    assert stats.markers == 3
    with open_snapshot(path) as snap:
        snap.verify()
        b = snap.block(BLOCK)
        assert sorted(np.flatnonzero(b.present)) == [3, 6, 7, 8]
        for page, value in ((3, 0x22), (6, 0x66), (7, 0x77), (8, 0x88)):
            assert bytes(snap.read_pages(b, page, 1)) == _page(value), page


def test_channel_error_aborts_and_removes_partial(tmp_path):
    main_a, main_b = socket.socketpair()
    a, b = socket.socketpair()
    bad = bytearray(MultifdInit(bytes(16), 0).pack())
    bad[0] ^= 0xFF
    threads = [_feeder(a, [bytes(bad)]), _feeder(main_a, [_main_stream(False, [])])]
    path = tmp_path / "snap"
    with pytest.raises(StreamError, match="magic"):
        receive_multifd(main_b, [b], SnapshotWriter(path))
    for t in threads:
        t.join(10)
    assert not path.exists() and not Path(str(path) + ".partial").exists()


def test_identify_channels():
    pairs = [socket.socketpair() for _ in range(3)]
    pairs[0][0].sendall(MultifdInit(bytes(16), 1).pack())
    pairs[1][0].sendall(E.header())
    pairs[2][0].sendall(MultifdInit(bytes(16), 0).pack())
    main, chans = identify_channels([p[1] for p in pairs])
    assert main is pairs[1][1] and chans == [pairs[0][1], pairs[2][1]]
    for x, y in pairs:
        x.close()
        y.close()


# -- real QEMU ------------------------------------------------------------------------------
CHANNELS = 2
CASES = [("7.2", "q35"), ("10", "pc-q35-7.2"), ("10", "q35")]
IDS = ["qemu7.2", "qemu10-pc-q35-7.2", "qemu10-q35"]


def _accept(listener: socket.socket, n: int, timeout: float = 60.0) -> list[socket.socket]:
    listener.settimeout(timeout)
    conns = []
    for _ in range(n):
        c, _ = listener.accept()
        c.settimeout(None)
        conns.append(c)
    return conns


def multifd_save(vm: Vm, workdir: Path, path: Path, live: bool, channels: int = CHANNELS):
    sock_path = workdir / "save.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(channels + 1)
    try:
        params = {"multifd-channels": channels, "max-bandwidth": 1 << 40}
        if live:
            params["downtime-limit"] = 2000
        vm.set_migration({"multifd": True}, params)
        vm.cmd("migrate", uri=f"unix:{sock_path}")
        conns = _accept(listener, channels + 1)
    finally:
        listener.close()
    try:
        main, chans = identify_channels(conns)
        stats = receive_multifd(main, chans, SnapshotWriter(path))
        vm.wait_migration(300)
    finally:
        for c in conns:
            c.close()
    return stats


def multifd_restore(vm: Vm, workdir: Path, path: Path, channels: int = CHANNELS):
    vm.set_migration({"multifd": True}, {"multifd-channels": channels})
    target = destination(vm.cmd("query-uuid"), vm.cmd("qom-get", path="/machine",
                                                      property="type"))
    sock_path = workdir / "restore.sock"
    vm.cmd("migrate-incoming", uri=f"unix:{sock_path}")
    deadline = time.monotonic() + 30
    while not sock_path.exists():
        assert time.monotonic() < deadline, "destination did not listen"
        time.sleep(0.02)
    conns = []
    try:
        for _ in range(channels + 1):  # main first (7.2 requires it)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path))
            conns.append(s)
        with open_snapshot(path) as snap:
            stats = send_multifd(snap, conns[0], conns[1:], target.uuid, target.sync_mode)
        vm.wait_incoming(300)
    finally:
        for c in conns:
            c.close()
    return stats, target.sync_mode, target.machine


@pytest.mark.qemu
@pytest.mark.parametrize("live", [False, True], ids=["paused", "live"])
@pytest.mark.parametrize(("qemu", "machine"), CASES, ids=IDS)
def test_multifd_save_restore_bootguest(qemu, machine, live, workdir):
    guest = BootGuest(memory_mb=256, limit_mb=64 if live else None)
    config = guest.config(qemu, workdir, machine=machine)
    path = workdir / "vm.snap"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        if not live:
            vm.stop()
        with guest.saving(vm) as saved:
            stats = multifd_save(vm, workdir, path, live)
    assert stats.channels and all(c.pages for c in stats.channels)
    expect_mode = "per-round" if (qemu, machine) == ("10", "q35") else "per-section"
    assert stats.sync_mode == expect_mode
    out = subprocess.run([sys.executable, "-c", "from vmsnap.cli import main; main()",
                          "verify", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with Vm(config, workdir, "dst", incoming="defer") as vm:
        sstats, mode, resolved = multifd_restore(vm, workdir, path)
        assert mode == expect_mode, resolved
        assert all(sstats.per_channel_pages)
        guest.check_restored(vm, saved)


@pytest.mark.qemu
def test_multifd_odd_channel_count(workdir):
    """3 channels: channels 0 and 1 share an I/O thread, channel 2 has its own; every page
    lands (file verified, guest RAM checked after a restore)."""
    guest = BootGuest(memory_mb=256)
    config = guest.config("7.2", workdir)
    path = workdir / "vm.snap"
    with Vm(config, workdir, "src") as vm:
        guest.boot(vm)
        guest.wait_alive(vm)
        vm.stop()
        with guest.saving(vm) as saved:
            stats = multifd_save(vm, workdir, path, False, channels=3)
    assert stats.channels and len(stats.channels) == 3
    assert all(c.pages for c in stats.channels)
    with open_snapshot(path) as snap:
        snap.verify()
    with Vm(config, workdir, "dst", incoming="defer") as vm:
        multifd_restore(vm, workdir, path, channels=3)
        guest.check_restored(vm, saved)
