"""receive_multifd: a QEMU multifd migration (main channel + N multifd channels) → snapshot.

The main channel is decoded by the single-channel `StreamReceiver`; each multifd channel is
drained by its own thread: 64-byte init, then 1344-byte packet headers, each followed by its
payload, read with `recv_into` straight into page-aligned buffers and written from there
(O_DIRECT `pwritev` at the pages' fixed file offsets, xxh3 from the same memory) by an
I/O thread per pair of channels, which joins the pair's neighbouring packets into large
writes. No Python-level copy of page data.

Ordering under live dirtying (reference §3.5) reproduces QEMU's own destination: the main
stream is cut into epochs at each sync marker (EOS in per-section mode, MULTIFD_FLUSH in
per-round mode: a FLUSH seen before the first EOS ⇒ per-round), each channel at each SYNC
packet (its own pages belong to the epoch it closes). A channel thread blocks after a SYNC
until the main thread reaches the matching marker; the main thread, at a marker, blocks
until every channel has applied all its pages up to its SYNC. Hence a page of epoch k+1
(a channel page or a main-channel ZERO record) is always applied after every copy of
epoch k, exactly the semantic QEMU's `multifd_recv_sync_main` gives.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import VmsnapError
from ..fileformat.writer import AlignedPages, SnapshotWriter
from ..io.aligned import AlignedBuffer, BufferPool
from ..io.sockets import shutdown_all
from ..stream import events as ev
from ..stream.constants import MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC
from ..stream.errors import StreamError
from ..stream.multifd import MultifdInit, PacketHeader, header_size, page_count
from ..stream.postcopy import rp_shut
from .receive import ReceiveStats, StreamReceiver

#: payload buffers per channel
DEFAULT_DEPTH = 4
#: packets per buffer: consecutive packets of a channel are checksummed/written as one job
BATCH_PACKETS = 8
#: hard bound on page buffers, whatever N and depth
MAX_BUFFER_BYTES = 256 << 20
#: most jobs an I/O thread takes at once (checksummed and written as one set)
MAX_SET = 8
#: channels per I/O thread: a pair of neighbours joins its packets into large writes, and
#: more channels keep more writes in flight
PER_APPLIER = 2
#: how long to wait for channels to close after the main stream ended
CHANNEL_CLOSE_TIMEOUT = 120.0

log = logging.getLogger(__name__)


class _Abort(Exception):
    """Raised in a waiting thread when another thread failed."""


class EpochGate:
    """QEMU's multifd_recv_sync_main handshake between the main thread and N channels."""

    def __init__(self, channels: int, on_fail: Callable[[], None] = lambda: None):
        self.cond = threading.Condition()
        self.on_fail = on_fail  # wakes threads blocked outside the gate (socket reads)
        self.main_epoch = 0  # markers the main thread has passed
        self.synced = [0] * channels  # SYNC packets each channel has fully applied
        self.closed = [False] * channels
        self.released = False
        self.error: BaseException | None = None
        self.mode: str | None = None  # "per-section" | "per-round"

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            first = self.error is None
            if first:
                self.error = exc
            self.cond.notify_all()
        if first:
            self.on_fail()

    def _check(self) -> None:
        if self.error is not None:
            raise _Abort() from self.error

    def raise_error(self) -> None:
        """Raise the first failure, if any thread failed."""
        if self.error is not None:
            raise self.error

    def cause(self) -> BaseException:
        """The first failure (call only once one was reported)."""
        assert self.error is not None
        return self.error

    def channel_sync(self, i: int) -> None:
        """Channel i applied its k-th SYNC packet: wait until the main thread passed marker k."""
        with self.cond:
            self.synced[i] += 1
            k = self.synced[i]
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.error is not None or self.released
                               or self.main_epoch >= k)
            self._check()

    def channel_closed(self, i: int) -> None:
        with self.cond:
            self.closed[i] = True
            self.cond.notify_all()

    def main_marker(self) -> None:
        """The main thread read a marker: wait until every channel applied its SYNC."""
        with self.cond:
            k = self.main_epoch + 1

            def ready() -> bool:
                if self.error is not None:
                    return True
                for s, c in zip(self.synced, self.closed, strict=True):
                    if s < k:
                        if c:
                            raise VmsnapError(
                                f"multifd channel closed before its SYNC for marker {k}")
                        return False
                return True

            self.cond.wait_for(ready)
            self._check()
            self.main_epoch = k
            self.cond.notify_all()

    def release_all(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()


class _MainReceiver(StreamReceiver):
    """StreamReceiver that also acts on sync markers and publishes the block list."""

    def __init__(self, writer: SnapshotWriter, gate: EpochGate):
        super().__init__(writer)
        self.gate = gate
        self.blocks_ready = threading.Event()
        self.block_sizes: dict[str, int] = {}
        self.markers = 0

    def _apply(self, e: ev.Event) -> None:
        if isinstance(e, ev.MultifdFlush):
            if self.gate.mode is None:
                self.gate.mode = "per-round"
                log.debug("multifd sync mode: per-round (MULTIFD_FLUSH before any EOS)")
            elif self.gate.mode != "per-round":
                raise VmsnapError("MULTIFD_FLUSH in a per-section multifd stream")
            self._marker()
        elif isinstance(e, ev.RamEos):
            if self.gate.mode is None:
                self.gate.mode = "per-section"
                log.debug("multifd sync mode: per-section (EOS first)")
            if self.gate.mode == "per-section":
                self._marker()
        else:
            super()._apply(e)
            if isinstance(e, ev.RamBlocks):
                self.block_sizes = {b.name: b.used_length for b in e.blocks}
                self.blocks_ready.set()

    def _marker(self) -> None:
        self.writer.flush()  # main-channel page writes of this epoch are on disk
        self.gate.main_marker()
        self.markers += 1
        log.debug("sync epoch %d: every channel applied its pages", self.markers)


def recv_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill `view` from `sock`; returns bytes read (< len only at EOF)."""
    pos, n = 0, view.nbytes
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos, socket.MSG_WAITALL)
        if not got:
            break
        pos += got
    return pos


@dataclass
class ChannelStats:
    id: int = -1
    packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    syncs: int = 0
    bytes: int = 0


@dataclass
class _PageJob:
    """Pages a channel received into a pool buffer: checksum and write them, then free it."""

    block: str
    offsets: np.ndarray
    buf: AlignedBuffer
    pages: int


@dataclass
class _ZeroJob:
    """Pages a packet declared zero: clear their bits."""

    block: str
    offsets: np.ndarray


@dataclass
class _Batch:
    """Pages of consecutive packets of one block, gathered in one pool buffer."""

    buf: AlignedBuffer
    block: str
    offsets: list[np.ndarray] = field(default_factory=list)
    pages: int = 0

    def job(self) -> _PageJob:
        return _PageJob(self.block, np.concatenate(self.offsets), self.buf, self.pages)


class _Applier:
    """The I/O thread of a pair of channels: applies each channel's jobs in that channel's
    order (so a SYNC still means "all applied"). Page jobs waiting together, from any
    channels, are checksummed and written as one set: QEMU deals a range out packet by
    packet over the channels, and the set's pages leave in few large contiguous writes
    (one thread per channel wrote each 512 KiB packet on its own)."""

    def __init__(self, writer: SnapshotWriter, pool: BufferPool, nchannels: int):
        self.writer = writer
        self.pool = pool
        self.jobs: queue.Queue[tuple[int, _PageJob | _ZeroJob] | None] = queue.Queue()
        self.cond = threading.Condition()
        self.queued = [0] * nchannels
        self.applied = [0] * nchannels
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vmsnap-mfd-io", daemon=True)

    def put(self, channel: int, job: _PageJob | _ZeroJob) -> None:
        self.raise_error()
        with self.cond:
            self.queued[channel] += 1
        self.jobs.put((channel, job))

    def wait(self, channel: int) -> None:
        """Until every job channel `channel` put is applied (raises the I/O failure)."""
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None
                               or self.applied[channel] >= self.queued[channel])
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (item := self.jobs.get()) is not None:
            batch = [item]
            while len(batch) < MAX_SET:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self._apply(batch)

    def _apply(self, batch: list[tuple[int, _PageJob | _ZeroJob]]) -> None:
        """Apply `batch` in order: each run of page jobs as one set (of a page sent twice,
        the later copy lands), zero jobs between."""
        try:
            if self.error is None:
                pages: list[_PageJob] = []
                for _, job in batch:
                    if isinstance(job, _PageJob):
                        pages.append(job)
                        continue
                    self._write(pages)
                    pages = []
                    self.writer.zero_pages(job.block, job.offsets)
                self._write(pages)
        except BaseException as e:  # noqa: BLE001 - raised in the channel threads
            self.error = e
        finally:
            for _, job in batch:
                if isinstance(job, _PageJob):
                    self.pool.release(job.buf)
            with self.cond:
                for i, _ in batch:
                    self.applied[i] += 1
                self.cond.notify_all()

    def _write(self, jobs: list[_PageJob]) -> None:
        ps = self.writer.page_size
        self.writer.write_aligned_set(
            [AlignedPages(j.block, j.offsets, j.buf.view[:j.pages * ps]) for j in jobs])


class _Channel:
    """One multifd connection: a thread that reads its packets into pool buffers and hands
    them to the shared `_Applier` (in order, so a SYNC means "all applied")."""

    def __init__(self, index: int, sock: socket.socket, rx: _MainReceiver, gate: EpochGate,
                 writer: SnapshotWriter, pool: BufferPool, applier: _Applier, nchannels: int,
                 seen_ids: set[int], ids_lock: threading.Lock, legacy: bool):
        self.i = index
        self.sock = sock
        self.rx = rx
        self.gate = gate
        self.writer = writer
        self.pool = pool
        self.applier = applier
        self.n = nchannels
        self.seen_ids = seen_ids
        self.ids_lock = ids_lock
        self.legacy = legacy
        self.stats = ChannelStats()
        self._batch: _Batch | None = None
        self._header = bytearray(header_size(writer.page_size))
        self.thread = threading.Thread(target=self._run, name=f"vmsnap-mfd{index}", daemon=True)

    def _drain(self) -> None:
        self.applier.wait(self.i)

    # -- channel thread: init, then packets until the source closes the connection
    def _run(self) -> None:
        try:
            self._receive()
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.gate.fail(e)
        finally:
            self.gate.channel_closed(self.i)

    def _receive(self) -> None:
        self._handshake()
        blocks = self._wait_for_blocks()
        try:
            while (h := self._next_header(blocks)) is not None:
                self._packet(h)
            self._flush()  # the source closed the channel after its last packet
        finally:
            if self._batch is not None:
                self.pool.release(self._batch.buf)
                self._batch = None

    def _handshake(self) -> None:
        """Read the init packet: the channel's id, each id once."""
        init = bytearray(MultifdInit.SIZE)
        if recv_exact(self.sock, memoryview(init)) != len(init):
            raise VmsnapError(f"multifd channel {self.i} closed before its init packet")
        ini = MultifdInit.parse(init, channels=self.n)
        with self.ids_lock:
            if ini.id in self.seen_ids:
                raise VmsnapError(f"duplicate multifd channel id {ini.id}")
            self.seen_ids.add(ini.id)
        self.stats.id = ini.id
        log.debug("multifd connection %d is channel id %d", self.i, ini.id)

    def _wait_for_blocks(self) -> dict[str, int]:
        """The RAM block sizes, once the main channel has read them (packets name blocks)."""
        while not self.rx.blocks_ready.wait(0.5):
            if self.gate.error is not None:
                raise _Abort()
        return self.rx.block_sizes

    def _next_header(self, blocks: dict[str, int]) -> PacketHeader | None:
        """The next packet header; None when the source closed the channel."""
        got = recv_exact(self.sock, memoryview(self._header))
        if got == 0:
            return None
        if got != len(self._header):
            raise VmsnapError(f"multifd channel {self.stats.id}: truncated packet header")
        try:
            return PacketHeader.parse(self._header, page_size=self.writer.page_size,
                                      blocks=blocks, legacy=self.legacy)
        except StreamError as e:
            raise VmsnapError(
                f"multifd channel {self.stats.id} packet {self.stats.packets}: {e}") from e

    def _packet(self, h: PacketHeader) -> None:
        st = self.stats
        st.packets += 1
        if h.normal_pages:
            self._payload(h)
        if h.zero_pages:
            self._flush()
            self.applier.put(self.i, _ZeroJob(h.block, h.zero_offsets.copy()))
            st.zero_pages += h.zero_pages
        if h.sync:
            self._flush()
            self._drain()
            st.syncs += 1
            self.gate.channel_sync(self.i)

    def _payload(self, h: PacketHeader) -> None:
        """Read the packet's pages into the batch buffer: consecutive packets of one block
        share a buffer, so one checksum/pwritev job per batch instead of per packet (the
        payload still lands in place)."""
        ps, n = self.writer.page_size, h.normal_pages
        if self._batch is not None and (self._batch.block != h.block
                                        or self._batch.pages + n > self.pool.size // ps):
            self._flush()
        self.applier.raise_error()
        if self._batch is None:
            self._batch = _Batch(self.pool.acquire(), h.block)
        batch = self._batch
        at = batch.pages * ps
        if recv_exact(self.sock, batch.buf.view[at:at + n * ps]) != n * ps:
            raise VmsnapError(f"multifd channel {self.stats.id}: truncated packet payload")
        batch.offsets.append(h.normal_offsets.copy())
        batch.pages += n
        self.stats.pages += n
        self.stats.bytes += n * ps

    def _flush(self) -> None:
        """Hand the batch to the I/O thread."""
        if self._batch is not None:
            job = self._batch.job()
            self._batch = None
            self.applier.put(self.i, job)


class _SocketSource:
    """`readinto` over a blocking socket, for StreamReceiver.feed_from."""

    def __init__(self, sock: socket.socket):
        self.readinto = sock.recv_into


def identify_channels(socks: Sequence[socket.socket], timeout: float | None = 60.0
                      ) -> tuple[socket.socket, list[socket.socket]]:
    """Split accepted connections into (main, multifd channels) by peeking their first 4
    bytes (QEMU's own rule since 8.0; 7.2 also sends its magic at once on every connection)."""
    main: socket.socket | None = None
    chans: list[socket.socket] = []
    for s in socks:
        old = s.gettimeout()
        s.settimeout(timeout)
        try:
            magic = s.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
        finally:
            s.settimeout(old)
        word = int.from_bytes(magic, "big") if len(magic) == 4 else None
        if word == QEMU_VM_FILE_MAGIC and main is None:
            main = s
            log.debug("connection %d: main channel", len(chans) + 1)
        elif word == MULTIFD_MAGIC:
            chans.append(s)
            log.debug("connection %d: multifd channel", len(chans) + (main is not None))
        else:
            raise VmsnapError(f"unexpected connection (first bytes {magic.hex()})")
    if main is None:
        raise VmsnapError("no main migration channel among the connections")
    return main, chans


@dataclass
class MultifdReceiveStats(ReceiveStats):
    channels: list[ChannelStats] | None = None
    sync_mode: str | None = None
    markers: int = 0


def receive_multifd(main: socket.socket, channels: Sequence[socket.socket],
                    writer: SnapshotWriter, *, legacy: bool = False,
                    depth: int = DEFAULT_DEPTH,
                    progress: Callable[[int], None] | None = None,
                    reply: bool = True) -> MultifdReceiveStats:
    """Receive a multifd migration from already-connected sockets and commit it via `writer`.

    `main`: the main migration channel; `channels`: the N multifd connections (any order;
    see `identify_channels`). `legacy`: the source is 7.2–8.2 (the packet word at +32 is
    reserved, not zero_pages; it is always 0 there so the default works for both).
    `depth`: page buffers per channel (BATCH_PACKETS packets each; all buffers together are
    capped at MAX_BUFFER_BYTES for up to 32 channels). With `reply`, a return path opened
    by the source gets the SHUT(0) answer on `main`. Blocking sockets are expected.
    On failure FILE.partial is removed and every socket is shut down.
    """
    nch = len(channels)
    pkt = page_count(writer.page_size) * writer.page_size * BATCH_PACKETS
    depth = max(2, min(depth, MAX_BUFFER_BYTES // max(1, nch * pkt)))
    # the first failure anywhere shuts every socket, so no thread stays blocked in a read
    gate = EpochGate(nch, on_fail=lambda: shutdown_all((main, *channels)))
    with writer:
        rx = _MainReceiver(writer, gate)
        pool = BufferPool(pkt, depth * nch) if nch else None
        appliers = ([_Applier(writer, pool, nch) for _ in range(0, nch, PER_APPLIER)]
                    if pool is not None else [])
        chans = _channels(channels, rx, gate, writer, pool, appliers, legacy)
        try:
            for a in appliers:
                a.thread.start()
            for c in chans:
                c.thread.start()
            total = _read_main(rx, main, gate, progress)
            if rx.return_path and reply:
                log.debug("return path: SHUT(0) to the source")
                main.sendall(rp_shut(0))
            _join_channels(chans, appliers, gate)
            if writer.metadata.machine_type is None:
                writer.metadata.machine_type = rx.machine_type
            writer.flush()
            writer.finish(rx.tail())
        except BaseException as e:
            _stop_channels(chans, appliers, gate, e)
            raise
        finally:
            if pool is not None and not any(t.is_alive() for t in _threads(chans, appliers)):
                pool.close()  # never unmap buffers a live thread may still touch
    return _stats(writer, rx, total, chans, gate)


def _channels(socks: Sequence[socket.socket], rx: _MainReceiver, gate: EpochGate,
              writer: SnapshotWriter, pool: BufferPool | None, appliers: Sequence[_Applier],
              legacy: bool) -> list[_Channel]:
    """The channels, each pair of neighbours (QEMU deals packets out in channel order)
    sharing one I/O thread."""
    if pool is None:
        return []
    ids: set[int] = set()
    lock = threading.Lock()
    return [_Channel(i, s, rx, gate, writer, pool, appliers[i // PER_APPLIER], len(socks), ids,
                     lock, legacy)
            for i, s in enumerate(socks)]


def _threads(chans: Sequence[_Channel], appliers: Sequence[_Applier]
             ) -> list[threading.Thread]:
    return [c.thread for c in chans] + [a.thread for a in appliers]


def _read_main(rx: _MainReceiver, main: socket.socket, gate: EpochGate,
               progress: Callable[[int], None] | None) -> int:
    """Decode the main channel to its end (no RAM pages there in multifd mode); returns
    its byte count. A channel's failure ends it with that failure."""
    source = _SocketSource(main)
    total = 0
    while rx.ended is None:
        gate.raise_error()
        try:
            got = rx.feed_from(source)
        except _Abort:
            raise gate.cause() from None
        if not got:
            break
        total += got
        if progress:
            progress(total)
    rx.close()
    return total


def _join_channels(chans: Sequence[_Channel], appliers: Sequence[_Applier],
                   gate: EpochGate) -> None:
    """Let every channel run to its end (the source closes them), then the I/O thread
    apply what they left, and raise what failed."""
    gate.release_all()
    for c in chans:
        c.thread.join(CHANNEL_CLOSE_TIMEOUT)
        if c.thread.is_alive():
            raise VmsnapError(f"multifd channel {c.i} did not close after the stream end")
    for a in appliers:
        a.stop()
    for a in appliers:
        a.thread.join()
        a.raise_error()
    gate.raise_error()


def _stop_channels(chans: Sequence[_Channel], appliers: Sequence[_Applier], gate: EpochGate,
                   err: BaseException) -> None:
    """After `err`: stop every thread; if a channel failed first (e.g. disk full), raise
    that, the cause, instead."""
    gate.fail(err)
    for c in chans:
        c.thread.join(10)
    for a in appliers:
        if a.thread.is_alive():
            a.stop()
            a.thread.join(10)
    cause = gate.cause()
    if cause is not err:
        raise cause from err


def _stats(writer: SnapshotWriter, rx: _MainReceiver, main_bytes: int,
           chans: Sequence[_Channel], gate: EpochGate) -> MultifdReceiveStats:
    cstats = [c.stats for c in chans]
    hsize = header_size(writer.page_size)
    return MultifdReceiveStats(
        writer.path,
        main_bytes + sum(c.bytes + c.packets * hsize + MultifdInit.SIZE for c in cstats),
        rx.pages + sum(c.pages for c in cstats), rx.zero_pages + sum(c.zero_pages for c in cstats),
        rx.blocks, rx.machine_type, writer.direct, cstats, gate.mode, rx.markers)
