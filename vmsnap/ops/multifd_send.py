"""send_multifd: a snapshot file → a QEMU destination with the `multifd` capability on.

vmsnap acts as the multifd source (reference §3.6): the main channel carries the stream
header, the RAM START/PART/END sections (ZERO records for small firmware blocks only) and
the device state; N channels each start with the 64-byte init (the destination's UUID) and
carry every present page exactly once in packets. Pages are read with O_DIRECT `preadv`
into page-aligned buffers by one reader thread per channel, checked against the trailer
and sent as `sendmsg([header, page run])` — no copy of page data in Python.

The sync protocol must match the destination's machine type (ops.destination):
per-section (machine ≤ 8.0): one SYNC packet per channel before each EOS (setup, PART, END);
per-round (≥ 8.1): SYNC on every channel + a MULTIFD_FLUSH record in setup and after the
last pages. A mismatch is fatal on 7.2 and silently drops pages on 10.x.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import VmsnapError
from ..fileformat.reader import BlockInfo, Snapshot
from ..io.aligned import AlignedBuffer
from ..io.sockets import shutdown_all
from ..io.vectored import Buffer, transfer_all
from ..stream import encoder
from ..stream.constants import MULTIFD_FLAG_SYNC
from ..stream.constants import TARGET_PAGE_SIZE as PAGE
from ..stream.multifd import MultifdInit, PacketHeader, header_size, page_count
from .destination import PER_ROUND, PER_SECTION, SYNC_MODES
from .send import (
    SendStats,
    device_state,
    explicit_zero_records,
    plain_stream_head,
    read_head,
)

#: pages read per job (4 MiB): one preadv per run, split into 128-page packets
CHUNK_PAGES = 1024
#: read buffers per channel (reader runs ahead of the sender by depth-1 chunks)
DEPTH = 3

log = logging.getLogger(__name__)

def sendmsg_all(sock: socket.socket, bufs: Sequence[Buffer]) -> int:
    """Send all buffers with as few `sendmsg` calls as the kernel allows (no copies)."""
    return transfer_all(lambda views, _done: sock.sendmsg(views), bufs)


@dataclass
class _Job:
    block: BlockInfo
    runs: list[tuple[int, int]]  # (first_page, count), in file order
    index: list[int]  # trailer table index of each run's first page
    pages: int


def plan_jobs(snap: Snapshot, chunk_pages: int = CHUNK_PAGES) -> list[_Job]:
    """Group present runs (same block, file order) into jobs of ≤ chunk_pages pages."""
    jobs: list[_Job] = []
    for b in snap.blocks:
        before = np.cumsum(b.present, dtype=np.int64) - b.present
        cur: _Job | None = None
        for first, count in snap.present_runs(b, chunk_pages):
            first, count = int(first), int(count)
            if cur is None or cur.pages + count > chunk_pages:
                cur = _Job(b, [], [], 0)
                jobs.append(cur)
            cur.runs.append((first, count))
            cur.index.append(int(before[first]))
            cur.pages += count
    return jobs


@dataclass
class MultifdSendStats(SendStats):
    channels: int = 0
    packets: int = 0
    sync_mode: str = ""
    per_channel_pages: list[int] = field(default_factory=list)


class _Sender:
    def __init__(self, snap: Snapshot, jobs: list[_Job], sync_mode: str, uuid: bytes,
                 verify: bool, depth: int, chunk_pages: int,
                 progress: Callable[[int, int], None] | None, stop: threading.Event):
        self.snap = snap
        self.jobs = jobs
        self.next_job = itertools.count()
        self.packet_num = itertools.count(1)
        self.mode = sync_mode
        self.uuid = uuid
        self.verify = verify
        self.depth = depth
        self.chunk_pages = chunk_pages
        self.progress = progress
        self.total = sum(j.pages for j in jobs) * PAGE
        self.done = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.stop = stop

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = e
        self.stop.set()

    def sync_packet(self) -> bytes:
        return PacketHeader.make("", np.zeros(0, np.uint64), flags=MULTIFD_FLAG_SYNC,
                                 packet_num=next(self.packet_num)).pack()

    # one reader thread per channel: O_DIRECT preadv of whole runs into aligned buffers
    def _reader(self, out: queue.Queue[tuple[_Job, AlignedBuffer] | None],
                free: queue.Queue[AlignedBuffer | None]) -> None:
        try:
            while not self.stop.is_set():
                k = next(self.next_job)
                if k >= len(self.jobs):
                    break
                job = self.jobs[k]
                buf = free.get()
                if buf is None:
                    return
                ps = job.block.page_size
                pos = 0
                for (first, count), idx in zip(job.runs, job.index, strict=True):
                    mv = self.snap.read_pages(job.block, first, count,
                                              into=buf.view[pos * ps:(pos + count) * ps])
                    if self.verify:
                        self.snap.check_pages(job.block, first, count, mv, idx)
                    pos += count
                out.put((job, buf))
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self.fail(e)
        finally:
            out.put(None)

    def channel(self, cid: int, sock: socket.socket, counts: list[int]) -> None:
        bufs = [AlignedBuffer(self.chunk_pages * PAGE) for _ in range(self.depth)]
        out: queue.Queue[tuple[_Job, AlignedBuffer] | None] = queue.Queue()
        free: queue.Queue[AlignedBuffer | None] = queue.Queue()
        for b in bufs:
            free.put(b)
        reader = threading.Thread(target=self._reader, args=(out, free),
                                  name=f"vmsnap-mfd{cid}-read", daemon=True)
        reader.start()  # before the first send, so a failing send can still join it
        try:
            sock.sendall(MultifdInit(self.uuid, cid).pack())
            sock.sendall(self.sync_packet())  # setup epoch
            log.debug("multifd channel %d: init sent, %s sync", cid, self.mode)
            per = page_count()
            while True:
                item = out.get()
                if item is None:
                    break
                job, buf = item
                ps = job.block.page_size
                offs = np.concatenate([np.arange(f, f + c, dtype=np.uint64)
                                       for f, c in job.runs]) * np.uint64(ps)
                for i in range(0, len(offs), per):
                    if self.stop.is_set():
                        return _release(sock, self.sync_packet())
                    chunk = offs[i:i + per]
                    hdr = PacketHeader.make(job.block.name, chunk,
                                            packet_num=next(self.packet_num),
                                            page_size=ps).pack(ps)
                    sendmsg_all(sock, [hdr, buf.view[i * ps:(i + len(chunk)) * ps]])
                counts[cid] += len(offs)
                free.put(buf)
                if self.progress:
                    with self.lock:
                        self.done += len(offs) * ps
                        self.progress(self.done, self.total)
            if self.stop.is_set():
                return _release(sock, self.sync_packet())
            sock.sendall(self.sync_packet())  # closes the RAM epoch (PART marker)
            log.debug("multifd channel %d: %d pages sent, RAM epoch closed", cid, counts[cid])
            if self.mode == PER_SECTION:
                sock.sendall(self.sync_packet())  # END section's EOS
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self.fail(e)
        finally:
            free.put(None)
            reader.join()
            for b in bufs:
                b.close()


def _release(sock: socket.socket, sync: bytes) -> None:
    """End a channel stopped between packets with a SYNC packet, then EOF. QEMU's main
    thread may be waiting, with its big lock held, for every channel's SYNC (a RAM EOS or
    FLUSH marker); 7.2 wakes it on nothing else, neither an EOF nor a channel error, so
    a channel ended otherwise leaves QEMU deaf to QMP and SIGTERM forever. Woken, it
    reads on, finds the main channel cut short, and its load fails."""
    try:
        sock.send(sync, socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def send_multifd(snap: Snapshot, main: socket.socket,
                 channels: Sequence[socket.socket], uuid: bytes, sync_mode: str, *,
                 verify: bool = True, depth: int = DEPTH, chunk_pages: int = CHUNK_PAGES,
                 progress: Callable[[int, int], None] | None = None,
                 stop: threading.Event | None = None,
                 fresh: Collection[str] = ()) -> MultifdSendStats:
    """Send the open snapshot `snap` to a multifd destination over connected sockets.

    `main` must have been connected first (QEMU 7.2 takes the first connection as the main
    channel), then `channels` (as many as the destination's `multifd-channels`).
    `uuid`: the destination's 16-byte UUID (`destination`); `sync_mode`: PER_SECTION
    or PER_ROUND from the destination machine type (`Destination.sync_mode`).
    A page failing its checksum, or `stop` set by the caller (Ctrl-C), stops all channels
    before the end of the stream, so the destination fails its load instead of running
    with bad RAM or waiting forever. Zero pages go as ZERO records on the main channel,
    except in the `fresh` blocks (see `explicit_zero_records`).
    """
    if sync_mode not in SYNC_MODES:
        raise ValueError(f"sync_mode must be one of {SYNC_MODES}")
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    if not channels:
        raise ValueError("need at least one multifd channel")
    if any(b.page_size != PAGE for b in snap.blocks):
        raise VmsnapError("multifd send supports 4 KiB pages only")
    per_round = sync_mode == PER_ROUND
    head = read_head(snap)
    snap.check_stream_ranges()
    sid = head.section.section_id
    flush = encoder.multifd_flush() if per_round else b""
    setup = plain_stream_head(snap, head, before_eos=flush)
    zero_records, zeros, _ = explicit_zero_records(snap, None, fresh=fresh)
    part = (encoder.section_part(sid) + zero_records + flush + encoder.eos()
            + encoder.footer(sid))
    tail = device_state(snap)  # END section (+ its EOS), device state, EOF, vmdesc
    jobs = plan_jobs(snap, chunk_pages)
    sender = _Sender(snap, jobs, sync_mode, uuid, verify, max(1, depth), chunk_pages,
                     progress, stop or threading.Event())
    counts = [0] * len(channels)
    main.sendall(setup)  # the main magic first, on the first connection
    threads = [threading.Thread(target=sender.channel, args=(i, s, counts),
                                name=f"vmsnap-mfd{i}-send", daemon=True)
               for i, s in enumerate(channels)]
    for t in threads:
        t.start()
    try:
        main.sendall(part)
        for t in threads:
            t.join()
        if sender.error is not None:
            raise sender.error
        if sender.stop.is_set():
            raise VmsnapError("restore stopped")
        main.sendall(tail)  # only once every page went out
    except BaseException as e:
        sender.fail(e)
        shutdown_all((main, *channels))
        for t in threads:
            t.join(30)
        raise
    packets = next(sender.packet_num) - 1
    sent = (len(setup) + len(part) + len(tail) + MultifdInit.SIZE * len(channels)
            + packets * header_size(PAGE) + sum(counts) * PAGE)
    return MultifdSendStats(sent, sum(counts), zeros, len(channels), packets, sync_mode, counts)
