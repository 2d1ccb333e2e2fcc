"""Postcopy wire pieces (sans-IO): the commands a postcopy source sends and a decoder of the
return-path messages a destination sends back on the same socket (reference §1.7, §4).

A source that makes QEMU run before it has its RAM sends, in order: OPEN_RETURN_PATH,
POSTCOPY_ADVISE, the RAM START, at least one POSTCOPY_RAM_DISCARD (without one, LISTEN
leaves the destination in the DISCARD state and RUN fails), then PACKAGED with a blob of
LISTEN + device state + PING + RUN. Pages then go in RAM PART sections, each exactly once;
the stream ends with a RAM END section and EOF (no vmdesc).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from . import constants as C
from .decoder import find_vmdesc
from .encoder import command, counted
from .errors import StreamError

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def rp_message(kind: int, payload: bytes = b"") -> bytes:
    """A return-path message (destination → source): be16 type, be16 length, payload."""
    return _BE16.pack(kind) + _BE16.pack(len(payload)) + payload


def rp_shut(status: int = 0) -> bytes:
    """SHUT: the destination is done (0) or failed (non-zero); the source may close."""
    return rp_message(C.MIG_RP_MSG_SHUT, _BE32.pack(status))


def open_return_path() -> bytes:
    return command(C.MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    return command(C.MIG_CMD_PING, _BE32.pack(value))


def postcopy_advise(page_size_summary: int, target_page_size: int) -> bytes:
    """`page_size_summary`: OR of every RAM block's page size (QEMU requires its own)."""
    return command(C.MIG_CMD_POSTCOPY_ADVISE,
                   _BE64.pack(page_size_summary) + _BE64.pack(target_page_size))


def postcopy_ram_discard(block: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """Discard byte ranges (start, length) of `block` on the destination."""
    if not ranges:
        raise ValueError("a discard command needs at least one range")
    body = (bytes([C.POSTCOPY_RAM_DISCARD_VERSION]) + counted(block) + b"\0"
            + b"".join(_BE64.pack(s) + _BE64.pack(n) for s, n in ranges))
    return command(C.MIG_CMD_POSTCOPY_RAM_DISCARD, body)


def packaged(device_sections: bytes) -> bytes:
    """PACKAGED command + its blob: LISTEN, the device state (FULL sections, no EOF), a PING
    and RUN. The destination reads the whole blob, loads the devices and starts the guest
    while its listen thread takes over the socket for pages."""
    blob = (command(C.MIG_CMD_POSTCOPY_LISTEN) + device_sections + ping(C.PACKAGED_PING)
            + command(C.MIG_CMD_POSTCOPY_RUN))
    return command(C.MIG_CMD_PACKAGED, _BE32.pack(len(blob))) + blob


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
class OtherMessage:
    type: int
    payload: bytes


RpMessage = Shut | Pong | ReqPages | OtherMessage


class ReturnPathDecoder:
    """Return-path bytes in, messages out. REQ_PAGES names no block: it means the block of
    the last REQ_PAGES_ID, which this decoder remembers."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._block: str | None = None
        self.offset = 0

    def feed(self, data: bytes) -> Iterator[RpMessage]:
        self._buf += data
        while len(self._buf) >= 4:
            kind, ln = _BE16.unpack_from(self._buf, 0)[0], _BE16.unpack_from(self._buf, 2)[0]
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
            yield self._message(kind, payload, at)

    def _message(self, kind: int, p: bytes, at: int) -> RpMessage:
        if kind == C.MIG_RP_MSG_SHUT:
            return Shut(_BE32.unpack(p)[0])
        if kind == C.MIG_RP_MSG_PONG:
            return Pong(_BE32.unpack(p)[0])
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
        return ReqPages(self._block, _BE64.unpack_from(p, 0)[0], _BE32.unpack_from(p, 8)[0])
