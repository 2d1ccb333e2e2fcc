"""postcopy_send: serve a snapshot file to a QEMU destination as its postcopy source.

The destination runs the guest as soon as it has the device state; every page it touches
before it arrives is asked for on the return path (the same socket, other direction) and
answered from its fixed offset in the file, checked against its checksum first: on QEMU's
postcopy-preempt channel when there is one (a second socket that carries nothing else, so
an answer never waits behind pushed pages), else on the main stream. Meanwhile
every other present page is pushed: reader threads read ahead (O_DIRECT, 1 MiB at a time,
hot pages first, then in file order from just after the last page requested, as QEMU's own
source does) and check the pages, a pusher sends them. Each page goes out exactly once
(QEMU places it atomically with UFFDIO_COPY and fails on a second copy): a page is claimed
when it is sent, not when read, so a request never waits for a read ahead (a page read and
checked ahead but not sent yet is answered from that buffer, not read again). Requests go
first: the pusher holds back while one is answered, and keeps what the destination has not
read yet below QUEUE_LIMIT, which is all an answer on the main stream can queue behind (and,
with preempt too, all a requested page that was already pushed waits for). With preempt,
whose channel the answers have to themselves, the pusher sends a whole read at a time and
the main socket's send buffer keeps that limit (the send waits in the kernel); on one
channel it sends SECTION_PAGES at a time, each once the queue is below the limit, so an
answer never waits for a send the queue holds up.

A run of requests in address order (a guest sweeping its RAM ahead of the push, which would
otherwise ask for it page by page, a round trip each) gets the pages after each answer sent
with it, on the same channel: 16 at the run's second request, twice as many at each next one,
at most 256 (1 MiB); the readers go on after them. A request of such a run for a page already
pushed (unread on the main stream: QEMU's one thread placing its pages is behind) gets the
first pages not sent yet after it on the preempt channel instead, once that is drained, for
QEMU's other thread to place meanwhile.

The preempt channel carries bare page records (no section around them: the destination's
preempt thread reads records until an EOS), each batch's first naming its block. How it
ends depends on the destination (QEMU's postcopy_ram_incoming_cleanup): before 8.0 QEMU
waits for its preempt thread to read an EOS, which is sent once every present page is out
(answers after it go on the main stream); from 8.0 on QEMU shuts the channel itself, after
every page it asked for arrived, so answers go there until the end.

Pages absent from the file (zero) are sent only when asked for, as ZERO records: the
destination discards all RAM when advised of postcopy, and unregisters userfaultfd when
the stream ends, so a page nobody touched reads as zero afterwards, as it was saved.
A page failing its checksum is never sent: the source stops (error naming block and
offset) and the caller cuts the stream; a vCPU that needs the page waits for it.

resume() instead of start() finishes a restore whose source died, on a destination that
`migrate-recover` gave this socket: it asks which pages the destination has (RECV_BITMAP
per block), resumes it (POSTCOPY_RESUME, RESUME_ACK) and then serves and pushes only the
others, ending the stream as start() does.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import VmsnapError
from ..fileformat.bitmap import contiguous_runs
from ..fileformat.hot import present_hot
from ..fileformat.reader import BlockInfo, Snapshot
from ..io.aligned import AlignedBuffer, BufferPool
from ..io.sockets import limit_queue, shutdown_all, unsent
from ..io.vectored import Buffer
from ..stream import constants as C
from ..stream import encoder
from ..stream import postcopy as pc
from ..stream.constants import TARGET_PAGE_SIZE as PAGE
from .multifd_send import sendmsg_all
from .send import device_state, plain_stream_head, read_head

log = logging.getLogger(__name__)
#: pages per background read (and per group of hot pages): 1 MiB O_DIRECT reads keep the
#: disk streaming (a request does not wait for them: see the module's doc)
CHUNK_PAGES = 256
#: pages per PART section the pusher sends at once on one channel: an answer waits behind
#: at most this much (with preempt: a read's worth, CHUNK_PAGES, in one send: 1 GiB at 32
#: cost ~0.05 CPU-s more in building and sending sections)
SECTION_PAGES = 32
READERS = 2
#: read buffers per reader: it reads the next chunk while its last ones wait to be sent
DEPTH = 2
#: the pusher holds its next section while more than this many bytes it sent are still
#: unread by the destination: an answer to a request queues behind at most this much
QUEUE_LIMIT = 1 << 20
#: how long the pusher sleeps while the destination reads, on one channel (seconds; with
#: preempt the kernel wakes it once a quarter of QUEUE_LIMIT is left: polling every 0.2 ms
#: cost ~0.1 CPU-s per GiB in ~5,000 wake-ups)
PACE = 0.0002
#: largest single page request served (a huge page)
MAX_REQUEST = 2 << 20
#: a run of requests in address order (each at most LEAP_SPAN pages past where the previous
#: one's pages, and those sent ahead of it, end) gets the pages after it sent ahead with the
#: answer: LEAP_MIN pages at its second request, twice as many at each next one, at most
#: LEAP_MAX (a guest sweeping its RAM faster than the push otherwise asks for it page by
#: page, a round trip each)
LEAP_MIN = 16
LEAP_MAX = 256
LEAP_SPAN = 1024
#: self.ahead's key of the pages read after those sent ahead (others are buffers' ids)
LEAD = 0
SHUT_TIMEOUT = 120.0
#: how long a recovering destination may take to answer RECV_BITMAP or POSTCOPY_RESUME
HANDSHAKE_TIMEOUT = 30.0


#: a pusher's job: (block, first page, count, None) for a run of pages, or (block, 0, 0,
#: pages) for the hot pages listed (ascending)
Job = tuple[BlockInfo, int, int, "np.ndarray | None"]


@dataclass
class PostcopyStats:
    stream_bytes: int = 0
    pages: int = 0  # present pages sent
    zero_pages: int = 0  # absent pages sent as ZERO on request
    requests: int = 0
    requested_pages: int = 0
    pushed_pages: int = 0
    #: microseconds from receiving a request to its page(s) sent, one entry per request
    #: that sent pages
    latencies_us: list[float] = field(default_factory=list)
    #: pages the destination asked for, in first-request order, per block (hot pages)
    requested: dict[str, list[int]] = field(default_factory=dict)
    #: resume(): pages of the file the destination already had (its RECV_BITMAP replies)
    already_received: int = 0
    #: pages and bytes sent on the preempt channel (answers)
    preempt_pages: int = 0
    preempt_bytes: int = 0
    #: requests answered from the pages read ahead, without a read of their own
    from_memory: int = 0
    #: pages sent ahead of a run of requests, with its answers (see LEAP_MIN)
    ahead_pages: int = 0


def postcopy_prologue(snap: Snapshot) -> tuple[bytes, bytes, int]:
    """(everything before the pages, the closing bytes, RAM section id): stream head with
    OPEN_RETURN_PATH and POSTCOPY_ADVISE, one discard, PACKAGED(LISTEN, devices, RUN)."""
    if any(b.page_size != PAGE for b in snap.blocks):
        raise VmsnapError("lazy restore supports 4 KiB pages only (no huge-page RAM)")
    head = read_head(snap)
    sid = head.section.section_id
    commands = pc.open_return_path() + pc.postcopy_advise(PAGE, PAGE)
    ram_end = encoder.section_end(sid) + encoder.eos() + encoder.footer(sid)
    tail = _skip_empty_rounds(device_state(snap), sid)
    if not tail.startswith(ram_end):
        raise VmsnapError(f"{snap.path}: device state does not follow an empty RAM END")
    first = snap.blocks[0].name
    prologue = (plain_stream_head(snap, head, commands=commands)
                + pc.postcopy_ram_discard(first, [(0, PAGE)])
                + pc.packaged(pc.device_sections(tail[len(ram_end):])))
    return prologue, ram_end + encoder.eof(), sid


def _skip_empty_rounds(tail: bytes, sid: int) -> bytes:
    """Drop what a file written by QEMU's own mapped-ram writer has before its RAM END: one
    empty PART section per round (its pages went to the file) and the SWITCHOVER_START hint
    (QEMU >= 10), neither of which means anything once the pages are sent by request."""
    empty_part = encoder.section_part(sid) + encoder.eos() + encoder.footer(sid)
    switchover = encoder.command(C.MIG_CMD_SWITCHOVER_START)
    start = 0
    while True:
        for skip in (empty_part, switchover):
            if tail.startswith(skip, start):
                start += len(skip)
                break
        else:
            return tail[start:]


class PostcopySource:
    """Drive one postcopy restore over a connected socket: start(), then wait()."""

    def __init__(self, snap: Snapshot, *,
                 hot: Mapping[str, np.ndarray] | None = None, readers: int = READERS,
                 chunk_pages: int = CHUNK_PAGES, queue_limit: int = QUEUE_LIMIT,
                 progress: Callable[[int, int], None] | None = None) -> None:
        """Everything that needs no destination yet (page index, stream prologue), so it
        can be made while the destination QEMU starts."""
        snap.check_stream_ranges()
        self.prologue, self.closing_bytes, self.sid = postcopy_prologue(snap)
        self.snap = snap
        self.sock: socket.socket | None = None  # the destination's, from start() or resume()
        #: the preempt channel answers go on, until it ends (None: the main stream)
        self.preempt: socket.socket | None = None
        self.preempt_eos = False  # end it with EOS once every present page is out
        self.preempt_lock = threading.Lock()
        self.channels: list[socket.socket] = []  # to cut on abort()
        self.readers = max(1, readers)
        self.chunk_pages = chunk_pages
        self.queue_limit = queue_limit
        self.section_pages = SECTION_PAGES  # pages per send, and
        self.paced = True  # whether the pusher polls the queue: see _connect
        self.progress = progress
        self.blocks = {b.name: b for b in snap.blocks}
        self.claimed = {b.name: np.zeros(b.npages, dtype=bool) for b in snap.blocks}
        self.hot = hot or {}
        self.hot_pages = present_hot(snap, self.hot)
        self.jobs: list[Job] | None = None  # planned by the first reader
        self.plan_lock = threading.Lock()
        self.take_lock = threading.Lock()  # which jobs are taken, the cursor
        self.taken = bytearray()
        self.hot_jobs = 0  # the plan's first jobs: hot pages
        self.cursor = 0  # the next file-order job to look at
        #: block -> (its first file-order job, the end page of each of its jobs)
        self.job_ends: dict[str, tuple[int, np.ndarray]] = {}
        self.total = sum(b.present_count * b.page_size for b in snap.blocks)
        self.stats = PostcopyStats()
        self.done = 0
        self.claim_lock = threading.Lock()  # claims, stats and progress
        self.send_lock = threading.Lock()
        self.urgent = 0  # requests being answered: pushers hold back their sends meanwhile
        self.serving = 0  # requests being answered, and the pages sent ahead of them
        self.turn = threading.Condition()
        #: what the readers read and checked and the pusher has not sent yet: buffer id ->
        #: (block name, its pages, their bytes)
        self.ahead: dict[int, tuple[str, np.ndarray, memoryview]] = {}
        self.ahead_lock = threading.Lock()
        #: the request thread's runs (_leap): block -> (the last request's first page, the
        #: page after the pages sent ahead of it (or after it), how many were sent ahead)
        self.leads: dict[str, tuple[int, int, int]] = {}
        #: the request thread's buffers, used again and again (a fresh mapping for every
        #: answer cost its page faults): pages answered or sent ahead, and two for the pages
        #: read after those (self.ahead[LEAD]: the one in use, the one read next)
        self.scratch = AlignedBuffer(max(MAX_REQUEST, LEAP_MAX * PAGE))
        self.leads_read = [AlignedBuffer(LEAP_MAX * PAGE) for _ in range(2)]
        self.error: BaseException | None = None
        self.failed = threading.Event()
        self.shut = threading.Event()
        self.shut_error: int | None = None
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.decoder = pc.ReturnPathDecoder()
        self.backlog: list[pc.RpMessage] = []  # read during resume(), served first

    # ---------------------------------------------------------------- plan and bookkeeping
    def _plan(self) -> None:
        """Hot pages first, chunk_pages at a time in address order (scattered pages go out
        together, each run read on its own, through the page cache: see _prefetch), then
        runs of present pages at most chunk_pages long, in file order (pages already sent
        are skipped when their job comes)."""
        jobs: list[Job] = []
        for b, pages in self.hot_pages:
            jobs += [(b, 0, 0, pages[i:i + self.chunk_pages])
                     for i in range(0, len(pages), self.chunk_pages)]
        self.hot_jobs = self.cursor = len(jobs)
        for b in self.snap.blocks:
            runs = self.snap.present_runs(b, self.chunk_pages)
            self.job_ends[b.name] = (len(jobs), runs.sum(axis=1))
            jobs += [(b, int(f), int(c), None) for f, c in runs]
        self.taken = bytearray(len(jobs))
        self.jobs = jobs

    def _take(self) -> Job | None:
        """The next job to read: hot pages first, then file order from the cursor, then
        from the start (jobs skipped by _follow), None when every job was taken."""
        with self.plan_lock:
            if self.jobs is None:
                self._plan()
        assert self.jobs is not None
        with self.take_lock:
            k = self.taken.find(0, 0, self.hot_jobs)
            for start in (self.cursor, self.hot_jobs):
                if k < 0:
                    k = self.taken.find(0, start)
            if k < 0:
                return None
            self.taken[k] = 1
            if k >= self.hot_jobs:
                self.cursor = k + 1
            return self.jobs[k]

    def _follow(self, name: str, page: int) -> None:
        """Push on from `page` of block `name` (the one after a requested page), as QEMU's
        source does: a guest that touched a page is likely to touch the next ones soon."""
        if self.jobs is None:  # being planned: never wait for that
            return
        start, ends = self.job_ends[name]
        k = start + int(np.searchsorted(ends, page, side="right"))
        with self.take_lock:
            self.cursor = k

    def _claim(self, name: str, pages: np.ndarray) -> np.ndarray:
        """Mark `pages` (distinct) as ours to send; return the mask of those not claimed
        before."""
        with self.claim_lock:
            claimed = self.claimed[name]
            new: np.ndarray = ~claimed[pages]
            claimed[pages] = True
        return new

    def _read_checked(self, b: BlockInfo, pages: np.ndarray, buf: AlignedBuffer,
                      cached: bool = False) -> memoryview:
        """Read `pages` (present, ascending) into `buf`, run by run, each checked against
        its checksum; the bytes read."""
        ps = b.page_size
        pos = 0
        for i, c in contiguous_runs(pages):
            f, c = int(pages[i]), int(c)
            mv = self.snap.read_pages(b, f, c, into=buf.view[pos * ps:(pos + c) * ps],
                                      cached=cached)
            self.snap.check_pages(b, f, c, mv, b.table_index(f))
            pos += c
        return buf.view[:pos * ps]

    def fail(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
        self.failed.set()

    def _send(self, parts: list[Buffer], closing: bool = False) -> None:
        """Send on the main stream, unless it was closed (a late answer for a page absent
        from the file: the destination leaves it zero)."""
        assert self.sock is not None
        with self.send_lock:
            if self.closing:
                return
            self.closing = closing
            self.stats.stream_bytes += sendmsg_all(self.sock, parts)

    def _send_answer(self, b: BlockInfo, pages: np.ndarray, data: memoryview | None) -> None:
        """Send requested pages (ZERO records when `data` is None): on the preempt channel
        while it is open, else on the main stream. Once the main stream's end is out, every
        present page is, and a destination that read it closes its preempt channel: an
        answer it then refuses is a late one for a page absent from the file, which reads
        as zero without it (see _send)."""
        with self.preempt_lock:
            if self.preempt is not None:
                try:
                    self.stats.preempt_bytes += sendmsg_all(
                        self.preempt, self._records(b, pages, data, section=False))
                except (BrokenPipeError, ConnectionResetError):
                    if not self.closing:
                        raise
                    self.preempt = None
                    return
                self.stats.preempt_pages += len(pages)
                return
        self._send(self._records(b, pages, data))

    def _end_preempt(self) -> None:
        """Before QEMU 8.0: EOS ends the destination's preempt thread, which QEMU waits for
        before it ends the restore; later answers go on the main stream."""
        with self.preempt_lock:
            if self.preempt is not None and self.preempt_eos:
                self.stats.preempt_bytes += sendmsg_all(self.preempt, [encoder.eos()])
                self.preempt = None

    def _push_section(self, b: BlockInfo, pages: np.ndarray, data: memoryview) -> int:
        """Send the pages (bytes in `data`) nobody claimed yet, after any request being
        answered and once the destination has read all but queue_limit of what was sent;
        the number sent."""
        if self.claimed[b.name][pages].all():  # sent ahead or on request: nothing to wait for
            return 0
        with self.turn:
            self.turn.wait_for(lambda: self.urgent == 0, 0.05)
        assert self.sock is not None
        while self.paced and unsent(self.sock) > self.queue_limit and not self.failed.is_set():
            time.sleep(PACE)
        new = self._claim(b.name, pages)
        if not new.all():  # some went out on request meanwhile
            pages = pages[new]
            data = memoryview(np.frombuffer(data, np.uint8).reshape(-1, b.page_size)[new]
                              .tobytes())
        if len(pages):
            self._send(self._records(b, pages, data))
        return len(pages)

    def _records(self, b: BlockInfo, pages: np.ndarray, data: memoryview | None,
                 section: bool = True) -> list[Buffer]:
        """A RAM PART section (or, for the preempt channel, just its records) with PAGE
        records for `pages` (bytes in `data`) or, when `data` is None, ZERO records."""
        sid = self.sid
        offs = pages.astype(np.uint64) * np.uint64(b.page_size)
        body: Sequence[Buffer]
        if data is None:
            body = [encoder.zero_records(b.name, offs)]
        else:
            body = encoder.page_records_packed(b.name, offs, data)
        if not section:
            return list(body)
        return [encoder.section_part(sid), *body, encoder.eos() + encoder.footer(sid)]

    # ---------------------------------------------------------------- lifecycle
    def start(self, sock: socket.socket, preempt: socket.socket | None = None,
              preempt_eos: bool = False) -> None:
        """Send what the destination on `sock` needs to run the guest, then serve and push
        pages. `preempt`: its postcopy-preempt channel, for answers; `preempt_eos`: end
        that with EOS (QEMU < 8.0)."""
        self._connect(sock, preempt, preempt_eos)
        self._send([self.prologue])
        log.debug("postcopy: prologue sent (%d bytes), %d bytes of pages to push",
                  len(self.prologue), self.total)
        self._start_threads()

    def _connect(self, sock: socket.socket, preempt: socket.socket | None,
                 preempt_eos: bool) -> None:
        self.sock, self.preempt, self.preempt_eos = sock, preempt, preempt_eos
        self.channels = [sock] if preempt is None else [sock, preempt]
        self.paced = preempt is None
        if not self.paced:
            self.section_pages = self.chunk_pages
            limit_queue(sock, self.queue_limit)

    def resume(self, sock: socket.socket, preempt: socket.socket | None = None,
               preempt_eos: bool = False) -> None:
        """Take over a recovering destination (postcopy-recover) on `sock` (and its new
        preempt channel, as for start()): learn the pages it has, resume it, then serve
        and push the others."""
        self._connect(sock, preempt, preempt_eos)
        self.decoder = pc.ReturnPathDecoder({b.name: b.npages for b in self.snap.blocks})
        self._send([b"".join(pc.recv_bitmap(b.name) for b in self.snap.blocks)])
        received: dict[str, np.ndarray] = {}
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            while len(received) < len(self.blocks):
                for msg in self._read_handshake():
                    if not isinstance(msg, pc.RecvBitmap):
                        raise VmsnapError(f"destination sent {msg} before its received pages")
                    received[msg.block] = msg.received
            self._send([pc.postcopy_resume()])
            acked = False
            while not acked:
                for msg in self._read_handshake():
                    if isinstance(msg, pc.ResumeAck) and msg.value == C.RESUME_ACK_VALUE:
                        acked = True
                    elif acked and isinstance(msg, pc.ReqPages):
                        self.backlog.append(msg)
                    else:
                        raise VmsnapError(f"destination answered the resume with {msg}")
        except TimeoutError:
            raise VmsnapError(f"the destination did not answer the postcopy recovery within "
                              f"{HANDSHAKE_TIMEOUT:.0f}s") from None
        finally:
            sock.settimeout(None)
        for b in self.snap.blocks:
            self.claimed[b.name] |= received[b.name]
        # of the file's pages: its bitmap also marks the holes the guest touched before
        self.stats.already_received = int(sum((b.present & received[b.name]).sum()
                                              for b in self.snap.blocks))
        self.total = sum(int((b.present & ~received[b.name]).sum()) * b.page_size
                         for b in self.snap.blocks)
        log.debug("postcopy recovery: destination has %d pages, %d bytes left to push, %d "
                  "requests waiting", self.stats.already_received, self.total, len(self.backlog))
        self._start_threads()

    def _read_handshake(self) -> list[pc.RpMessage]:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise VmsnapError("destination closed the migration socket during the recovery")
        return list(self.decoder.feed(data))

    def _start_threads(self) -> None:
        """Serve requests and push pages; the readers plan their work themselves (it takes
        ~60 ms per GiB), so start() returns as soon as the destination can run the guest."""
        self.threads = [threading.Thread(target=self._serve, name="vmsnap-rp", daemon=True)]
        self.threads.append(threading.Thread(target=self._push, name="vmsnap-push",
                                             daemon=True))
        if self.hot_pages:
            self.threads.append(threading.Thread(target=self._prefetch, name="vmsnap-prefetch",
                                                 daemon=True))
        for t in self.threads:
            t.start()

    def wait(self, timeout: float = SHUT_TIMEOUT) -> PostcopyStats:
        """Wait until every present page is out, end the stream, wait for the destination's
        SHUT. Raises the first failure (e.g. ChecksumMismatch) as soon as it happens."""
        pushers = self.threads[1:]
        while any(t.is_alive() for t in pushers):
            if self.failed.wait(0.05) and self.error is not None:
                raise self.error
        with self.turn:  # a page claimed by a request is out only once its answer is
            while self.serving and not self.failed.is_set():
                self.turn.wait(0.05)
        if self.error is not None:
            raise self.error
        self._end_preempt()
        self._send([self.closing_bytes], closing=True)
        deadline = time.monotonic() + timeout
        while not self.shut.wait(0.05):
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise VmsnapError("destination did not finish the postcopy restore")
        if self.shut_error:
            raise VmsnapError(f"destination ended the restore with error {self.shut_error}")
        return self.stats

    def abort(self) -> None:
        """Cut the stream: a destination in postcopy pauses (postcopy-paused)."""
        self.fail(VmsnapError("aborted"))
        shutdown_all(self.channels)
        for t in self.threads:
            t.join(10)

    # ---------------------------------------------------------------- threads
    def _serve(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            backlog, self.backlog = self.backlog, []
            t0 = time.perf_counter()
            while True:
                for msg in backlog:
                    if isinstance(msg, pc.ReqPages):
                        with self._counted("serving"):
                            with self._counted("urgent"):
                                ahead = self._answer(msg, t0)
                            if ahead is not None:  # the pusher need not wait for those
                                self._send_ahead(*ahead)
                    elif isinstance(msg, pc.Shut):
                        self.shut_error = msg.error
                        self.shut.set()
                if self.shut.is_set():
                    return
                data = sock.recv(65536)
                t0 = time.perf_counter()
                if not data:
                    if not self.closing:
                        self.fail(VmsnapError("destination closed the migration socket "
                                              "during the restore"))
                    return
                backlog = list(self.decoder.feed(data))
        except BaseException as err:  # noqa: BLE001 - reported by wait()
            if not self.failed.is_set():
                self.fail(err)

    @contextlib.contextmanager
    def _counted(self, counter: str) -> Iterator[None]:
        """Count this thread in `counter` (urgent, serving) meanwhile."""
        with self.turn:
            setattr(self, counter, getattr(self, counter) + 1)
        try:
            yield
        finally:
            with self.turn:
                setattr(self, counter, getattr(self, counter) - 1)
                self.turn.notify_all()

    def _answer(self, req: pc.ReqPages, t0: float) -> tuple[BlockInfo, int, int] | None:
        """Send the pages asked for that nobody sent yet; the range of pages to send ahead
        of them next, if any (see _leap)."""
        b = self.blocks.get(req.block)
        ps = b.page_size if b else PAGE
        if (b is None or req.start % ps or req.length % ps or not 0 < req.length <= MAX_REQUEST
                or req.start + req.length > b.used_length):
            raise VmsnapError(f"destination asked for pages outside the snapshot: "
                              f"{req.block!r} {req.start:#x}+{req.length:#x}")
        first, count = req.start // ps, req.length // ps
        end = first + count
        st = self.stats
        st.requests += 1
        st.requested_pages += count
        st.requested.setdefault(b.name, []).extend(range(first, end))
        new = np.arange(first, end)
        new = new[self._claim(b.name, new)]
        if len(new):
            present = b.present[new]
            if not present.all():
                self._send_answer(b, new[~present], None)
                st.zero_pages += int((~present).sum())
            wanted = new[present]
            if len(wanted):
                data, copied = self._gather(b, wanted, self.scratch)
                self._send_answer(b, wanted, data)
                st.from_memory += copied == len(wanted)
                self._count(len(wanted) * ps, len(wanted), pushed=False)
            st.latencies_us.append((time.perf_counter() - t0) * 1e6)
        return self._leap(b, first, end, answered=len(new) > 0)

    def _leap(self, b: BlockInfo, first: int, end: int, answered: bool
              ) -> tuple[BlockInfo, int, int] | None:
        """After a request for [first, end): the pages to send ahead of it, if any, and
        where the readers go on (_follow: after those). None for the first request of a
        run, then LEAP_MIN pages, doubling up to LEAP_MAX while each request comes after
        the previous one and at most LEAP_SPAN pages past its reach (its pages and those
        sent ahead of it: the push may have brought some after them). A guest sweeping RAM
        in address order ahead of the push gets them in batches on the answers' channel,
        where it asked for each and waited a round trip. A request for pages already sent
        (the guest waits for the main stream) gets, while the preempt channel is drained,
        the first pages after it not sent yet: QEMU places them in its preempt thread
        while its main one is busy with those queued before."""
        prev, reach, sent = self.leads.get(b.name, (-1, -1, 0))
        run = 0 <= reach and prev < first <= reach + LEAP_SPAN
        size = min(max(2 * sent, LEAP_MIN), LEAP_MAX) if run else 0
        start = end
        if size and not answered:
            lane = self.preempt
            todo = self._unsent(b, end, end + LEAP_SPAN)
            if lane is None or unsent(lane) or not len(todo):
                size = 0
            else:
                start = int(todo[0])
        self.leads[b.name] = (first, start + size, size)
        self._follow(b.name, start + 2 * size)  # after them and the next ones (_send_ahead)
        return (b, start, min(start + size, b.npages)) if size else None

    def _send_ahead(self, b: BlockInfo, start: int, stop: int) -> None:
        """Send the present pages of [start, stop) nobody sent yet, checked, as answers are
        (claimed when sent: the pusher drops them); then read as many after them, for the
        run's next request and pages sent ahead of it (the readers go on after those)."""
        pages = self._unsent(b, start, stop)
        ps = b.page_size
        if len(pages):
            data, _ = self._gather(b, pages, self.scratch)
            new = self._claim(b.name, pages)
            if not new.all():  # pushed meanwhile
                pages = pages[new]
                data = memoryview(np.frombuffer(data, np.uint8).reshape(-1, ps)[new]
                                  .tobytes())
            if len(pages):
                self._send_answer(b, pages, data)
            self.stats.ahead_pages += len(pages)
            self._count(len(pages) * ps, len(pages), pushed=False)
        nxt = self._unsent(b, stop, stop + stop - start)
        if len(nxt):  # kept with the buffers read ahead (the old ones may hold some)
            data, _ = self._gather(b, nxt, self.leads_read[1])
            with self.ahead_lock:
                self.ahead[LEAD] = (b.name, nxt, data)
            self.leads_read.reverse()  # [0]: the one in self.ahead

    def _unsent(self, b: BlockInfo, start: int, stop: int) -> np.ndarray:
        """The present pages of [start, stop) of `b` nobody sent yet."""
        stop = min(stop, b.npages)
        return np.arange(start, stop)[b.present[start:stop] & ~self.claimed[b.name][start:stop]]

    def _gather(self, b: BlockInfo, pages: np.ndarray, buf: AlignedBuffer
                ) -> tuple[memoryview, int]:
        """`pages` (present, ascending) into `buf`, every one checked: copied from the
        buffers the readers read and checked ahead where they are there (no read queued on
        the disk behind the readers': the guest running on the pushers' front asks for pages
        just ahead of it, which _follow then has read next), the others read. Returns the
        bytes and how many pages were copied."""
        ps = b.page_size
        out = buf.array[:len(pages) * ps].reshape(-1, ps)
        found = np.zeros(len(pages), dtype=bool)
        with self.ahead_lock:
            for name, got, data in self.ahead.values():
                if name != b.name:
                    continue
                k = np.minimum(np.searchsorted(got, pages), len(got) - 1)
                hit = (got[k] == pages) & ~found
                if hit.any():
                    out[hit] = np.frombuffer(data, np.uint8).reshape(-1, ps)[k[hit]]
                    found |= hit
        missing = np.flatnonzero(~found)
        for i, c in contiguous_runs(pages[missing]):
            at, f, c = int(missing[i]), int(pages[missing[i]]), int(c)
            mv = self.snap.read_pages(b, f, c, into=buf.view[at * ps:(at + c) * ps],
                                      urgent=True)
            self.snap.check_pages(b, f, c, mv, b.table_index(f))
        return buf.view[:len(pages) * ps], len(pages) - len(missing)

    def _prefetch(self) -> None:
        """Have the kernel read every hot page of a local file at once, ahead of the pushers
        (which read them through the page cache): one O_DIRECT read per scattered page, two
        at a time, took 1.2-2.3 s for a 32 MiB working set of pages 124 KiB apart on this
        host's disk, where readahead of all of them and cached reads took 0.14 s."""
        try:
            for b, pages in self.hot_pages:
                for i in range(0, len(pages), self.chunk_pages):
                    if self.failed.is_set():
                        return
                    self.snap.prefetch_pages(b, pages[i:i + self.chunk_pages])
        except OSError as err:  # only a hint: the pushers read what did not come
            log.debug("postcopy: prefetch of hot pages stopped: %s", err)

    def _push(self) -> None:
        """Send what the readers read and checked, as it comes."""
        ready: queue.SimpleQueue[tuple[BlockInfo, np.ndarray, memoryview, AlignedBuffer]
                                 | None] = queue.SimpleQueue()
        with BufferPool(self.chunk_pages * PAGE, self.readers * DEPTH) as pool:
            readers = [threading.Thread(target=self._read_ahead, args=(pool, ready),
                                        name=f"vmsnap-read{i}", daemon=True)
                       for i in range(self.readers)]
            for t in readers:
                t.start()
            try:
                left = len(readers)
                while left:
                    item = ready.get()
                    if item is None:
                        left -= 1
                        continue
                    b, pages, data, buf = item
                    if not self.failed.is_set():
                        ps = b.page_size
                        n = self.section_pages
                        sent = sum(self._push_section(b, pages[i:i + n], data[i * ps:(i + n) * ps])
                                   for i in range(0, len(pages), n))
                        self._count(sent * ps, sent, pushed=True)
                    del data
                    with self.ahead_lock:  # never copied from once given back
                        del self.ahead[id(buf)]
                    pool.release(buf)
            except BaseException as err:  # noqa: BLE001 - reported by wait()
                self.fail(err)
            finally:
                for t in readers:
                    t.join()

    def _read_ahead(self, pool: BufferPool, ready: queue.SimpleQueue[
            tuple[BlockInfo, np.ndarray, memoryview, AlignedBuffer] | None]) -> None:
        """Read and check the jobs' pages not sent yet, into the pool's buffers, for _push
        (a job partly sent by answers and the pages sent ahead of them: the rest only)."""
        try:
            while (job := self._take()) is not None and not self.failed.is_set():
                b, first, count, listed = job
                pages = np.arange(first, first + count) if listed is None else listed
                pages = pages[~self.claimed[b.name][pages]]
                if not len(pages):
                    continue
                buf = self._acquire(pool)
                if buf is None:
                    return
                try:
                    if len(pages) == count:  # a whole run: one read
                        data = self.snap.read_pages(b, first, count, into=buf)
                        self.snap.check_pages(b, first, count, data, b.table_index(first))
                    else:  # hot pages, through the page cache (see _prefetch), or what is left
                        data = self._read_checked(b, pages, buf, cached=listed is not None)
                except BaseException:
                    pool.release(buf)
                    raise
                with self.ahead_lock:
                    self.ahead[id(buf)] = (b.name, pages, data)
                ready.put((b, pages, data, buf))
        except BaseException as err:  # noqa: BLE001 - reported by wait()
            self.fail(err)
        finally:
            ready.put(None)

    def _acquire(self, pool: BufferPool) -> AlignedBuffer | None:
        """A free buffer, or None once the restore failed."""
        while not self.failed.is_set():
            try:
                return pool.acquire(0.05)
            except TimeoutError:
                pass
        return None

    def _count(self, nbytes: int, pages: int, pushed: bool) -> None:
        with self.claim_lock:
            self.done += nbytes
            done = self.done
            self.stats.pages += pages
            if pushed:
                self.stats.pushed_pages += pages
        if self.progress:
            self.progress(done, self.total)
