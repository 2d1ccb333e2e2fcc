"""The postcopy source's background push, against a destination the test plays on a socket
pair (no QEMU): every present page arrives once and intact, an answered request queues
behind at most QUEUE_LIMIT of pushed bytes however far the pushers could run ahead, and
the push goes on from the page after the one requested (as QEMU's own source does)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
from fileformat.streambytes import prefix, tail

from vmsnap.fileformat import SnapshotWriter, TrailerMetadata, open_snapshot
from vmsnap.io.sockets import unsent, widen
from vmsnap.ops import postcopy_send
from vmsnap.ops.send import plain_stream_head, read_head
from vmsnap.stream import StreamDecoder
from vmsnap.stream import constants as C
from vmsnap.stream import events as ev
from vmsnap.stream import postcopy as pc
from vmsnap.stream.constants import TARGET_PAGE_SIZE as PS

RAM = 32 << 20
PAGES = RAM // PS
BLOCKS = [("pc.ram", RAM)]


def write_snapshot(path) -> np.ndarray:
    """A snapshot whose pc.ram pages are all present and random; its RAM."""
    ram = np.random.default_rng(8).integers(0, 256, RAM, dtype=np.uint8)
    w = SnapshotWriter(path, TrailerMetadata(qemu_version="10.0.0",
                                             machine_type="pc-q35-10.0"))
    w.begin(prefix("pc-q35-10.0", BLOCKS), BLOCKS)
    w.write_pages("pc.ram", np.arange(PAGES, dtype=np.uint64) * PS, ram.data)
    w.finish(tail())
    return ram


def req_pages(block: str, page: int) -> bytes:
    name = block.encode()
    return pc.rp_message(C.MIG_RP_MSG_REQ_PAGES_ID,
                         struct.pack(">QIB", page * PS, PS, len(name)) + name)


def test_request_answered_ahead_of_the_push_which_then_follows_it(tmp_path):
    path = tmp_path / "vm.snap"
    ram = write_snapshot(path)
    wanted = PAGES // 2
    with open_snapshot(path) as snap:
        source = postcopy_send.PostcopySource(snap)
        ours, theirs = socket.socketpair()
        widen(ours, theirs)  # as rendezvous.pass_socket gives them: 8 MiB
        with ours, theirs:
            source.start(ours)
            theirs.settimeout(30)
            prologue = bytearray()
            while len(prologue) < len(source.prologue):
                prologue += theirs.recv(len(source.prologue) - len(prologue))
            # the destination reads nothing more until the pushers stopped sending: as far
            # as they could run ahead of it before a request
            deadline = time.monotonic() + 20
            last = -1
            while (queued := unsent(ours)) != last and time.monotonic() < deadline:
                last = queued
                time.sleep(0.3)
            assert queued >= postcopy_send.QUEUE_LIMIT, queued
            theirs.sendall(req_pages("pc.ram", wanted))
            while not source.stats.latencies_us:  # answered: still not a byte more read
                assert time.monotonic() < deadline + 20, "the request was not answered"
                time.sleep(0.01)
            stream = bytearray()
            done = threading.Thread(target=source.wait, daemon=True)
            done.start()
            while not stream.endswith(source.closing_bytes):
                data = theirs.recv(1 << 20)
                assert data, "the source closed the stream before its end"
                stream += data
            theirs.sendall(pc.rp_shut(0))
            done.join(30)
            assert not done.is_alive() and source.error is None
        head = plain_stream_head(snap, read_head(snap))
    dec = StreamDecoder()
    dec.feed(head + stream)
    at = {}  # page -> its record's position in what came after the prologue
    got = np.zeros(RAM, np.uint8)
    for e in dec.events():
        if isinstance(e, ev.Pages):
            assert e.block == "pc.ram"
            pages = (e.offsets // PS).astype(np.int64)
            assert not set(pages.tolist()) & at.keys(), "a page sent twice"
            for i, p in enumerate(pages.tolist()):
                at[p] = e.stream_offset - len(head) + i * (PS + 8)
            got.reshape(-1, PS)[pages] = np.frombuffer(e.data, np.uint8).reshape(-1, PS)
    assert len(at) == PAGES and np.array_equal(got, ram)
    behind = at[wanted]
    slack = 4 * postcopy_send.SECTION_PAGES * (PS + 64)
    assert behind <= postcopy_send.QUEUE_LIMIT + slack, \
        f"the requested page came {behind} bytes after the request"
    assert at[wanted + 1] < at[wanted - 1], "the push did not go on after the requested page"
    assert source.stats.requests == 1 and source.stats.pushed_pages == PAGES - 1
