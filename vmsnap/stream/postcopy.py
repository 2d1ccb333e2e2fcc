"""Postcopy wire pieces (sans-IO): the commands a postcopy source sends and a decoder of the
return-path messages a destination sends back on the same socket (reference §1.7, §4).

A source that makes QEMU run before it has its RAM sends, in order: OPEN_RETURN_PATH,
POSTCOPY_ADVISE, the RAM START, at least one POSTCOPY_RAM_DISCARD (without one, LISTEN
leaves the destination in the DISCARD state and RUN fails), then PACKAGED with a blob of
LISTEN + device state + PING + RUN. Pages then go in RAM PART sections, each exactly once;
the stream ends with a RAM END section and EOF (no vmdesc).

Recovery (QEMU's postcopy recovery, a destination in postcopy-paused given a new channel by
`migrate-recover`): the new channel carries no header. The source sends RECV_BITMAP per RAM
block; the destination answers each with a RECV_BITMAP return-path message whose length
covers only the counted block name, followed by raw bytes outside the return-path framing:
be64 size, the received-pages bitmap (little-endian unsigned longs, one bit per target page,
size rounded up to 8 bytes), be64 RECV_BITMAP_ENDING. The source then sends POSTCOPY_RESUME,
the destination answers RESUME_ACK(1), and pages flow again as before (each exactly once:
never one the bitmap has). Checked against QEMU 7.2 and 10 (savevm.c
loadvm_handle_recv_bitmap, ram.c ramblock_recv_bitmap_send) and their real bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import constants as C
from .constants import BE16, BE32, BE64
from .decoder import find_vmdesc
from .encoder import command, counted
from .errors import StreamError


def rp_message(kind: int, payload: bytes = b"") -> bytes:
    """A return-path message (destination → source): be16 type, be16 length, payload."""
    return BE16.pack(kind) + BE16.pack(len(payload)) + payload


def rp_shut(status: int = 0) -> bytes:
    """SHUT: the destination is done (0) or failed (non-zero); the source may close."""
    return rp_message(C.MIG_RP_MSG_SHUT, BE32.pack(status))


def open_return_path() -> bytes:
    return command(C.MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    return command(C.MIG_CMD_PING, BE32.pack(value))


def postcopy_advise(page_size_summary: int, target_page_size: int) -> bytes:
    """`page_size_summary`: OR of every RAM block's page size (QEMU requires its own)."""
    return command(C.MIG_CMD_POSTCOPY_ADVISE,
                   BE64.pack(page_size_summary) + BE64.pack(target_page_size))


def postcopy_ram_discard(block: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """Discard byte ranges (start, length) of `block` on the destination."""
    if not ranges:
        raise ValueError("a discard command needs at least one range")
    body = (bytes([C.POSTCOPY_RAM_DISCARD_VERSION]) + counted(block) + b"\0"
            + b"".join(BE64.pack(s) + BE64.pack(n) for s, n in ranges))
    return command(C.MIG_CMD_POSTCOPY_RAM_DISCARD, body)


def recv_bitmap(block: str) -> bytes:
    """Ask a recovering destination for the pages of `block` it has received."""
    return command(C.MIG_CMD_RECV_BITMAP, counted(block))


def postcopy_resume() -> bytes:
    """Tell a recovering destination to go on (it answers RESUME_ACK)."""
    return command(C.MIG_CMD_POSTCOPY_RESUME)


def bitmap_size(npages: int) -> int:
    """Bytes of a RECV_BITMAP bitmap for a block of `npages` target pages."""
    return (npages + 63) // 64 * 8


def packaged(device_sections: bytes) -> bytes:
    """PACKAGED command + its blob: LISTEN, the device state (FULL sections, no EOF), a PING
    and RUN. The destination reads the whole blob, loads the devices and starts the guest
    while its listen thread takes over the socket for pages."""
    blob = (command(C.MIG_CMD_POSTCOPY_LISTEN) + device_sections + ping(C.PACKAGED_PING)
            + command(C.MIG_CMD_POSTCOPY_RUN))
    return command(C.MIG_CMD_PACKAGED, BE32.pack(len(blob))) + blob


def device_sections(after_ram_end: bytes) -> bytes:
    """The FULL sections of a device-state tail (`... FULL sections, EOF [, vmdesc]`),
    without EOF and vmdesc: what goes in a PACKAGED blob."""
    j = find_vmdesc(after_ram_end)
    end = j - 1 if j is not None else len(after_ram_end) - 1
    if end < 0 or after_ram_end[end] != C.QEMU_VM_EOF:
        raise StreamError("device state does not end with EOF", "device_state",
                          len(after_ram_end), "0x00 [vmdesc]")
    return after_ram_end[:end]


# --------------------------------------------------------------------------- return path
@dataclass(frozen=True)
class Shut:
    error: int


@dataclass(frozen=True)
class Pong:
    value: int


@dataclass(frozen=True)
class ReqPages:
    """A page request: `length` bytes at byte `start` of `block`."""

    block: str
    start: int
    length: int


@dataclass(frozen=True)
class RecvBitmap:
    """The pages of `block` a recovering destination has: one bool per page."""

    block: str
    received: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class ResumeAck:
    value: int


@dataclass(frozen=True)
class OtherMessage:
    type: int
    payload: bytes


RpMessage = Shut | Pong | ReqPages | RecvBitmap | ResumeAck | OtherMessage


class ReturnPathDecoder:
    """Return-path bytes in, messages out. REQ_PAGES names no block: it means the block of
    the last REQ_PAGES_ID, which this decoder remembers. `pages` (block name -> page count)
    are the blocks whose RECV_BITMAP replies are expected: each reply's size must match."""

    def __init__(self, pages: Mapping[str, int] | None = None) -> None:
        self._buf = bytearray()
        self._block: str | None = None
        self._pages = dict(pages or {})
        self._bitmap: str | None = None  # the block whose raw bitmap comes next
        self.offset = 0

    @property
    def truncated(self) -> bool:
        """Bytes of an unfinished message are buffered (an end here cut it)."""
        return bool(self._buf) or self._bitmap is not None

    def feed(self, data: bytes) -> Iterator[RpMessage]:
        self._buf += data
        while True:
            if self._bitmap is not None:
                bitmap = self._take_bitmap(self._bitmap)
                if bitmap is None:
                    return
                yield bitmap
                continue
            if len(self._buf) < 4:
                return
            kind, ln = BE16.unpack_from(self._buf, 0)[0], BE16.unpack_from(self._buf, 2)[0]
            fixed = C.RP_FIXED_LENGTHS.get(kind)
            if ln > C.RP_MAX_LEN or (fixed is not None and ln != fixed):
                raise StreamError(f"return-path message {kind} has length {ln}",
                                  "rp.len", self.offset + 2, str(fixed or C.RP_MAX_LEN))
            if len(self._buf) < 4 + ln:
                return
            payload = bytes(self._buf[4:4 + ln])
            del self._buf[:4 + ln]
            at = self.offset
            self.offset += 4 + ln
            msg = self._message(kind, payload, at)
            if msg is not None:
                yield msg

    def _take_bitmap(self, name: str) -> RecvBitmap | None:
        """The raw part of a RECV_BITMAP reply, once all of it is in (None before)."""
        npages = self._pages[name]
        want = bitmap_size(npages)
        if len(self._buf) >= 8 and (size := BE64.unpack_from(self._buf, 0)[0]) != want:
            raise StreamError(f"RECV_BITMAP of {name!r} says {size} bytes, its {npages} "
                              f"pages take {want}", "rp.recv_bitmap.size", self.offset,
                              str(want))
        if len(self._buf) < 16 + want:
            return None
        end = BE64.unpack_from(self._buf, 8 + want)[0]
        if end != C.RECV_BITMAP_ENDING:
            raise StreamError(f"RECV_BITMAP of {name!r} ends with {end:#x}, not the ending "
                              "marker", "rp.recv_bitmap.end", self.offset + 8 + want,
                              f"{C.RECV_BITMAP_ENDING:#x}")
        bits = np.unpackbits(np.frombuffer(bytes(self._buf[8:8 + want]), np.uint8),
                             bitorder="little")[:npages].astype(bool)
        del self._buf[:16 + want]
        self.offset += 16 + want
        self._bitmap = None
        return RecvBitmap(name, bits)

    def _message(self, kind: int, p: bytes, at: int) -> RpMessage | None:
        if kind == C.MIG_RP_MSG_SHUT:
            return Shut(BE32.unpack(p)[0])
        if kind == C.MIG_RP_MSG_PONG:
            return Pong(BE32.unpack(p)[0])
        if kind == C.MIG_RP_MSG_RESUME_ACK:
            return ResumeAck(BE32.unpack(p)[0])
        if kind == C.MIG_RP_MSG_RECV_BITMAP:
            name = p[1:].decode("ascii", "replace")
            if len(p) < 2 or p[0] + 1 != len(p) or name not in self._pages:
                raise StreamError(f"unexpected or malformed RECV_BITMAP ({name!r})",
                                  "rp.recv_bitmap", at, None)
            self._bitmap = name
            return None
        if kind == C.MIG_RP_MSG_REQ_PAGES_ID:
            if len(p) < 14 or p[12] + 13 != len(p) or p[12] == 0:
                raise StreamError("malformed REQ_PAGES_ID", "rp.req_pages_id", at, None)
            self._block = p[13:].decode("ascii", "replace")
        elif kind == C.MIG_RP_MSG_REQ_PAGES:
            if self._block is None:
                raise StreamError("REQ_PAGES before any REQ_PAGES_ID", "rp.req_pages", at,
                                  None)
        else:
            return OtherMessage(kind, p)
        return ReqPages(self._block, BE64.unpack_from(p, 0)[0], BE32.unpack_from(p, 8)[0])
