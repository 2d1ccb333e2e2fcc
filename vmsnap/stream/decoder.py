"""Sans-IO decoder of QEMU's migration stream: bytes in, typed events out.

Usage::

    dec = StreamDecoder()
    for chunk in chunks:
        dec.feed(chunk)
        for ev in dec.events():
            ...
    for ev in dec.close():   # raises StreamError if the stream is incomplete
        ...

Page records are parsed in vectorised batches (numpy): a run of PAGE|CONTINUE records
is viewed as records of stride ``8 + page_size``; ``Pages.data`` is one contiguous copy.

mapped-ram files: after each block header the stream jumps to ``pages_offset +
used_length``. Bytes fed in between are discarded (streamed, bounded memory); a file
reader may instead call :meth:`StreamDecoder.seek` with :attr:`StreamDecoder.wanted_offset`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Collection, Iterator
from typing import NoReturn

from ..lazy_numpy import np
from . import constants as C
from .constants import BE16, BE32, BE64
from .errors import StreamError
from .events import (
    Command,
    Configuration,
    DeviceState,
    Event,
    Header,
    MappedRamHeader,
    MultifdFlush,
    Pages,
    Prelude,
    RamBlock,
    RamBlocks,
    RamEnd,
    RamEos,
    SectionEnd,
    SectionPart,
    SectionStart,
    StreamEnd,
    ZeroPages,
)

_RAM_SIG_TAIL = b"\x03ram" + BE32.pack(0) + BE32.pack(4)  # after 0x01 + be32 sid


class State(enum.Enum):
    """Where the decoder is in the stream; the value names it in errors (StreamError.field
    of a truncated stream)."""

    HEADER = "header"  # file magic and version
    CONFIG = "config"  # the configuration section, if any
    TOP = "top"  # top-level records before the RAM START
    PRELUDE = "prelude"  # device sections before the RAM START, kept verbatim
    MEMSIZE = "memsize"  # the RAM START's MEM_SIZE record
    BLOCKS = "blocks"  # its RAM block list
    SKIP = "skip"  # over a mapped-ram block's bitmap and page area
    RAM = "ram-records"  # PAGE/ZERO/EOS/MULTIFD_FLUSH records of a RAM section
    RAMTOP = "ram-top"  # between RAM sections
    DEVICE = "device"  # device state after the RAM END, up to EOF and vmdesc
    END = "end"
    ERROR = "error"


#: Every transition the decoder makes (any state may also go to ERROR).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.HEADER: frozenset({State.CONFIG}),
    State.CONFIG: frozenset({State.TOP}),
    State.TOP: frozenset({State.MEMSIZE, State.PRELUDE}),
    State.PRELUDE: frozenset({State.TOP}),
    State.MEMSIZE: frozenset({State.BLOCKS, State.RAM}),
    State.BLOCKS: frozenset({State.BLOCKS, State.RAM, State.SKIP}),
    State.SKIP: frozenset({State.BLOCKS, State.RAM}),
    State.RAM: frozenset({State.RAMTOP, State.DEVICE}),
    State.RAMTOP: frozenset({State.RAM, State.DEVICE}),
    State.DEVICE: frozenset({State.END}),
    State.END: frozenset(),
    State.ERROR: frozenset(),
}

_PRELUDE_KEEP = 16
#: ZERO|CONTINUE records one `_zero_run` looks at, at most: a run checks the records ahead
#: of it, and the buffer may hold megabytes of other records after a short run.
_ZERO_SCAN = 1 << 14


def find_vmdesc(buf: bytes | bytearray, max_len: int = C.MAX_VMDESC_LEN) -> int | None:
    """Index of the VMDESCRIPTION byte if `buf` ends with `00 06 be32(L) JSON(L)` (a JSON
    object), else None. JSON holds no NUL, so candidates sit around the last NUL (in L)."""
    if not buf or buf[-1:] not in (b"}", b"\n", b" ", b"\r", b"\t"):
        return None
    z = buf.rfind(b"\x00")
    if z < 0:
        return None
    for j in range(max(1, z - 4), z + 2):
        if j + 5 > len(buf) or buf[j - 1] != 0 or buf[j] != C.QEMU_VM_VMDESCRIPTION:
            continue
        ln = BE32.unpack_from(buf, j + 1)[0]
        if j + 5 + ln != len(buf) or ln > max_len:
            continue
        try:
            obj = json.loads(bytes(buf[j + 5:]))
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return j
    return None


def leading_pages(headers: np.ndarray, used_length: int, page_size: int) -> int:
    """How many of `headers` (the be64 words of RAM records), from the first, are plain
    PAGE|CONTINUE records with a page inside a block of `used_length` bytes."""
    if used_length < page_size:
        return 0
    mask = np.uint64(page_size - 1)
    bad = np.flatnonzero(
        ((headers & mask) != np.uint64(C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE))
        | ((headers & ~mask) > np.uint64(used_length - page_size)))
    return int(bad[0]) if bad.size else len(headers)


class _NeedMore(Exception):
    pass


class StreamDecoder:
    """Incremental decoder. See module docstring.

    ``page_size``: target page size (4096 on x86).
    ``blocks_with_page_size``: names of blocks whose MEM_SIZE entry carries the optional
    be64 page_size field; only honoured after a 16-byte POSTCOPY_ADVISE (§2.2).
    ``max_vmdesc``: cap for the vmdesc JSON length.
    """

    def __init__(
        self,
        page_size: int = C.TARGET_PAGE_SIZE,
        *,
        blocks_with_page_size: Collection[str] = (),
        max_vmdesc: int = C.MAX_VMDESC_LEN,
    ) -> None:
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, got {page_size}")
        self.page_size = page_size
        self._mask = page_size - 1
        self._blocks_with_page_size = frozenset(blocks_with_page_size)
        self._max_vmdesc = max_vmdesc
        self._buf = memoryview(b"")
        self._scratch = [bytearray(), bytearray()]
        self._which = 0
        self._pos = 0
        self._base = 0  # absolute offset of _buf[0]
        self._state = State.HEADER
        self._after_skip = State.RAM  # where SKIP leads (set with _skip_to)
        self._closed = False
        self._error: StreamError | None = None
        self._out: list[Event] = []
        #: RamEos already emitted for the EOS word at the current position (footer pending)
        self._eos_sent = False
        #: the caller reads runs of page records itself (`page_run`): parsing stops at a
        #: PAGE|CONTINUE record instead of copying its page out
        self.direct_pages = False
        self._handed = 0  # absolute offset of the bytes `page_run` handed over last
        # stream knowledge
        self.capabilities: tuple[str, ...] = ()
        self.machine_type: str | None = None
        self.postcopy_advised = False
        self.ram_section_id: int | None = None
        self.blocks: dict[str, RamBlock] = {}
        self._block_list: list[RamBlock] = []
        self._total = 0
        self._remaining = 0
        self._last_block: RamBlock | None = None
        self._section_kind = "start"
        self._skip_to = 0
        self._tail = bytearray()  # device-state suffix kept for end detection
        self.end: StreamEnd | None = None
        self.device_offset: int | None = None  # where the device state (after RAM) begins

    # ------------------------------------------------------------------ public API
    @property
    def offset(self) -> int:
        """Absolute offset of the next unparsed byte."""
        return self._base + self._pos

    @property
    def fed_offset(self) -> int:
        """Absolute offset just past the last byte fed."""
        return self._base + len(self._buf)

    @property
    def wanted_offset(self) -> int:
        """Absolute offset of the next byte the decoder actually needs (differs from
        :attr:`fed_offset` while jumping over a mapped-ram bitmap/page area)."""
        if self._state == State.SKIP:
            return max(self._skip_to, self.fed_offset)
        return self.fed_offset

    @property
    def mapped_ram(self) -> bool:
        return C.CAP_MAPPED_RAM in self.capabilities

    def seek(self, offset: int) -> None:
        """Continue feeding at absolute ``offset``; only legal while jumping over a
        mapped-ram area, with ``fed_offset <= offset <= wanted_offset``."""
        if self._state != State.SKIP or not (self.fed_offset <= offset <= self._skip_to):
            raise ValueError(
                f"seek({offset}) not allowed (state {self._state.value}, fed {self.fed_offset})"
            )
        self._base = offset
        self._buf = memoryview(b"")
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append stream bytes. ``bytes`` are referenced without copying; other buffers
        are copied (into reused scratch buffers), so the caller may reuse them."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StreamError("feed() after close()", "input", self.fed_offset)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        if self._state == State.END:
            self._fail("data after the end of the stream", "trailing data", self.fed_offset,
                       "nothing")
        rem = len(self._buf) - self._pos
        if rem == 0 and isinstance(data, bytes):
            self._base += len(self._buf)
            self._buf = memoryview(data)
            self._pos = 0
            return
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        self._which ^= 1
        scratch = self._scratch[self._which]
        need = rem + n
        if len(scratch) < need:
            scratch = bytearray(max(need, 2 * len(scratch)))
            self._scratch[self._which] = scratch
        scratch[:rem] = self._buf[self._pos:]
        scratch[rem:need] = src
        self._base += self._pos
        self._buf = memoryview(scratch)[:need]
        self._pos = 0

    def feed_from(self, readinto: Callable[[memoryview], int | None], size: int) -> int:
        """Read up to `size` stream bytes with `readinto` straight into the decoder's own
        buffer, after the unparsed rest of the previous one: the bulk is never copied again.
        Returns the count read (0 at end of input)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StreamError("feed() after close()", "input", self.fed_offset)
        rem = len(self._buf) - self._pos
        self._which ^= 1
        scratch = self._scratch[self._which]
        if len(scratch) < rem + size:
            scratch = bytearray(max(rem + size, 2 * len(scratch)))
            self._scratch[self._which] = scratch
        view = memoryview(scratch)
        view[:rem] = self._buf[self._pos:]
        n = readinto(view[rem:rem + size]) or 0
        if n and self._state == State.END:
            self._fail("data after the end of the stream", "trailing data", self.fed_offset,
                       "nothing")
        self._base += self._pos
        self._buf = view[:rem + n]
        self._pos = 0
        return n

    def _at_page_run(self) -> bool:
        """Inside RAM records after a page or zero record of a block, where a PAGE|CONTINUE
        record of that block may follow."""
        return (self._state == State.RAM and self._last_block is not None
                and not self._eos_sent and not self._closed and not self.mapped_ram)

    def page_run(self, limit: int) -> tuple[RamBlock, memoryview] | None:
        """If the unparsed rest may begin a PAGE|CONTINUE record of the block of the last
        page or zero record, and is shorter than one such record (or `direct_pages` stopped
        the parse there): hand up to `limit` bytes of it over with the block, so that the
        caller reads the next page records itself (`leading_pages` tells which are), then
        calls `resume` (the bytes stay valid until then)."""
        blk = self._last_block
        rest = self._buf[self._pos:]
        if (not self._at_page_run() or blk is None
                or (len(rest) >= 8 + self.page_size and not self.direct_pages)):
            return None
        if len(rest) >= 8 and not leading_pages(
                np.frombuffer(rest[:8], dtype=">u8"), blk.used_length, self.page_size):
            return None
        if len(rest) > limit:  # what stays may be borrowed (`resume`): own it
            self._buf = memoryview(bytes(self._buf))
            rest = self._buf[self._pos:]
        out = rest[:limit]
        self._handed = self._base + self._pos
        self._pos += len(out)
        return blk, out

    def resume(self, consumed: int, rest: bytes | memoryview) -> None:
        """Continue after `page_run`: the caller took `consumed` stream bytes (whole
        PAGE|CONTINUE records, counted from the start of the bytes it was handed) and
        `rest` follows them, which the decoder parses (before what `page_run` held back).
        `rest` is used in place, not copied: the caller keeps it unchanged until the
        decoder hands its page records back (`page_run`) or reads on (`feed_from`)."""
        held = bytes(self._buf[self._pos:])
        self._base = self._handed + consumed
        self._pos = 0
        if held or (self._state == State.END and len(rest)):
            self._buf = memoryview(b"")
            self.feed(rest)
            self.feed(held)
        else:
            self._buf = memoryview(rest).cast("B")

    def events(self) -> Iterator[Event]:
        """Yield every event that can be parsed from the bytes fed so far."""
        if self._error is not None:
            raise self._error
        while True:
            if self._out:
                out, self._out = self._out, []
                yield from out
            if not self._step_guarded():
                break
        if self._out:
            out, self._out = self._out, []
            yield from out

    def close(self) -> list[Event]:
        """Mark the input complete; return the remaining events.

        Raises StreamError if the stream is incomplete."""
        if self._error is not None:
            raise self._error
        self.direct_pages = False  # no caller reads page runs any more: parse them here
        evs = list(self.events())
        self._closed = True
        if self._state == State.DEVICE:
            self._device_close()
            evs.extend(self._out)
            self._out = []
        if self._state != State.END:
            self._fail(
                f"stream truncated (state {self._state.value}, "
                f"{len(self._buf) - self._pos} unparsed bytes)",
                self._state.value, self.offset, "more data",
            )
        return evs

    # ------------------------------------------------------------------ helpers
    def _fail(self, message: str, field: str, offset: int,
              expected: str | None = None) -> NoReturn:
        self._error = StreamError(message, field, offset, expected)
        self._state = State.ERROR
        raise self._error

    def _need(self, pos: int, n: int) -> None:
        if len(self._buf) - pos < n:
            raise _NeedMore

    def _u8(self, pos: int) -> int:
        self._need(pos, 1)
        return self._buf[pos]

    def _be16(self, pos: int) -> int:
        self._need(pos, 2)
        value: int = BE16.unpack_from(self._buf, pos)[0]
        return value

    def _be32(self, pos: int) -> int:
        self._need(pos, 4)
        value: int = BE32.unpack_from(self._buf, pos)[0]
        return value

    def _be64(self, pos: int) -> int:
        self._need(pos, 8)
        value: int = BE64.unpack_from(self._buf, pos)[0]
        return value

    def _counted(self, pos: int, field: str) -> tuple[str, int]:
        n = self._u8(pos)
        if n == 0:
            self._fail("empty counted string", field, self._base + pos, "length 1..255")
        self._need(pos + 1, n)
        raw = bytes(self._buf[pos + 1 : pos + 1 + n])
        try:
            s = raw.decode("ascii")
        except UnicodeDecodeError:
            self._fail(f"non-ASCII name {raw!r}", field, self._base + pos + 1, "ASCII")
        return s, pos + 1 + n

    def _step_guarded(self) -> bool:
        save = self._pos
        try:
            return self._step()
        except _NeedMore:
            self._pos = save
            return False
        except StreamError as e:
            self._error = e
            self._state = State.ERROR
            raise

    # ------------------------------------------------------------------ state machine
    def _step(self) -> bool:
        """Parse what the current state reads (see _STEPS); False when it needs more input
        (or the stream is over)."""
        step = _STEPS.get(self._state)
        return step(self) if step is not None else False

    def _go(self, state: State) -> None:
        """Move to `state`, which TRANSITIONS must allow (a decoder bug otherwise)."""
        if state not in TRANSITIONS[self._state]:
            raise AssertionError(f"decoder: no transition {self._state.value} -> {state.value}")
        self._state = state
        if state is State.DEVICE:
            self.device_offset = self._base + self._pos

    def _header(self) -> bool:
        p = self._pos
        magic = self._be32(p)
        if magic != C.QEMU_VM_FILE_MAGIC:
            self._fail(f"bad magic 0x{magic:08x}", "magic", self._base + p, "0x5145564d (QEVM)")
        ver = self._be32(p + 4)
        if ver != C.QEMU_VM_FILE_VERSION:
            self._fail(f"unsupported stream version {ver}", "version", self._base + p + 4, "3")
        self._pos = p + 8
        self._out.append(Header(ver))
        self._go(State.CONFIG)
        return True

    def _config(self) -> bool:
        p0 = p = self._pos
        t = self._u8(p)
        if t != C.QEMU_VM_CONFIGURATION:
            # machine types <= 2.3 send no configuration
            self._go(State.TOP)
            return True
        n = self._be32(p + 1)
        if n == 0 or n > C.MAX_MACHINE_NAME:
            self._fail(f"machine name length {n}", "configuration.len", self._base + p + 1,
                       f"1..{C.MAX_MACHINE_NAME}")
        self._need(p + 5, n)
        try:
            machine = bytes(self._buf[p + 5 : p + 5 + n]).decode("ascii")
        except UnicodeDecodeError:
            self._fail("non-ASCII machine type", "configuration.name", self._base + p + 5,
                       "ASCII")
        p += 5 + n
        caps: list[str] = []
        subs: list[tuple[str, int, bytes]] = []
        page_bits = None
        uuid = None
        while self._u8(p) == C.QEMU_VM_SUBSECTION:
            sp = p
            name, p = self._counted(p + 1, "configuration.subsection.name")
            ver = self._be32(p)
            p += 4
            fstart = p
            if name == C.CAPS_SUBSECTION:
                cnt = self._be32(p)
                if cnt > C.MAX_CAPABILITIES:
                    self._fail(f"capability count {cnt}", "capabilities.count", self._base + p,
                               f"<= {C.MAX_CAPABILITIES}")
                p += 4
                for _ in range(cnt):
                    cap, p = self._counted(p, "capabilities.name")
                    caps.append(cap)
            elif name == C.PAGE_BITS_SUBSECTION:
                page_bits = self._be32(p)
                p += 4
                if (1 << page_bits if page_bits < 64 else 0) != self.page_size:
                    self._fail(f"target page bits {page_bits}", "target-page-bits",
                               self._base + p - 4, f"log2({self.page_size})")
            elif name == C.UUID_SUBSECTION:
                self._need(p, 16)
                uuid = bytes(self._buf[p : p + 16])
                p += 16
            else:
                self._fail(f"unknown configuration subsection {name!r}",
                           "configuration.subsection", self._base + sp,
                           "capabilities, target-page-bits or uuid")
            subs.append((name, ver, bytes(self._buf[fstart:p])))
        raw = bytes(self._buf[p0:p])
        self._pos = p
        self.machine_type = machine
        self.capabilities = tuple(caps)
        self._out.append(Configuration(machine, tuple(caps), raw, tuple(subs), page_bits, uuid))
        self._go(State.TOP)
        return True

    def _command(self, p: int) -> None:
        cmd = self._be16(p + 1)
        ln = self._be16(p + 3)
        if not 1 <= cmd < C.MIG_CMD_MAX:
            self._fail(f"unknown command {cmd}", "command.cmd", self._base + p + 1, "1..11")
        fixed = C.COMMAND_LENGTHS[cmd]
        if fixed is not None and ln not in fixed:
            self._fail(f"command {C.COMMAND_NAMES[cmd]} has length {ln}", "command.len",
                       self._base + p + 3, " or ".join(map(str, fixed)))
        if cmd == C.MIG_CMD_PACKAGED:
            self._fail("PACKAGED command (postcopy) not supported", "command.cmd",
                       self._base + p + 1, "a precopy stream")
        self._need(p + 5, ln)
        payload = bytes(self._buf[p + 5 : p + 5 + ln])
        if cmd == C.MIG_CMD_POSTCOPY_ADVISE and ln == 16:
            self.postcopy_advised = True
        self._pos = p + 5 + ln
        self._out.append(Command(cmd, payload))

    def _is_ram_start(self, p: int) -> bool:
        self._need(p, 5 + len(_RAM_SIG_TAIL))
        return self._buf[p] == C.QEMU_VM_SECTION_START and bytes(
            self._buf[p + 5 : p + 5 + len(_RAM_SIG_TAIL)]
        ) == _RAM_SIG_TAIL

    def _section_name(self, p: int) -> str:
        try:
            name, _ = self._counted(p + 5, "section.idstr")
        except _NeedMore:
            return "?"
        return name

    def _top(self) -> bool:
        p = self._pos
        t = self._u8(p)
        if t == C.QEMU_VM_COMMAND:
            self._command(p)
            return True
        if t == C.QEMU_VM_SECTION_START:
            if self._is_ram_start(p):
                sid = self._be32(p + 1)
                self._pos = p + 5 + len(_RAM_SIG_TAIL)
                self.ram_section_id = sid
                self._out.append(SectionStart(sid, "ram", C.RAM_INSTANCE_ID, C.RAM_VERSION_ID))
                self._go(State.MEMSIZE)
                return True
            self._go(State.PRELUDE)
            return True
        if t == C.QEMU_VM_SECTION_FULL:
            self._go(State.PRELUDE)
            return True
        self._fail(f"unexpected record type 0x{t:02x} before the RAM START", "record.type",
                   self._base + p, "COMMAND (0x08), START (0x01) or FULL (0x04)")
        return False

    def _prelude(self) -> bool:
        buf, p = bytes(self._buf), self._pos
        search = p + 1
        while True:
            i = buf.find(_RAM_SIG_TAIL, search)
            if i < 0:
                break
            if i - 5 >= p and buf[i - 5] == C.QEMU_VM_SECTION_START:
                if i - 5 > p:
                    self._out.append(Prelude(bytes(buf[p : i - 5])))
                self._pos = i - 5
                self._go(State.TOP)
                return True
            search = i + 1
        keep_from = max(p, len(buf) - _PRELUDE_KEEP)
        if keep_from > p:
            self._out.append(Prelude(bytes(buf[p:keep_from])))
            self._pos = keep_from
            return True
        raise _NeedMore

    def _memsize(self) -> bool:
        p = self._pos
        a = self._be64(p)
        flags = a & self._mask
        if flags != C.RAM_SAVE_FLAG_MEM_SIZE:
            self._fail(f"first RAM record has flags 0x{flags:x}", "ram.mem_size",
                       self._base + p, "MEM_SIZE (0x4)")
        self._total = self._remaining = a & ~self._mask
        self._block_list = []
        self.blocks = {}
        self._pos = p + 8
        self._go(State.BLOCKS if self._remaining else State.RAM)
        if not self._remaining:
            self._out.append(RamBlocks(()))
        return True

    def _block(self) -> bool:
        p0 = self._pos
        name, p = self._counted(p0, "ramblock.idstr")
        if name in self.blocks:
            self._fail(f"duplicate RAMBlock {name!r}", "ramblock.idstr", self._base + p0,
                       "unique names")
        if len(self._block_list) >= C.MAX_RAM_BLOCKS:
            self._fail("too many RAMBlocks", "ramblock.idstr", self._base + p0,
                       f"<= {C.MAX_RAM_BLOCKS}")
        used = self._be64(p)
        if used > self._remaining:
            self._fail(f"block {name!r} used_length {used} exceeds the remaining total "
                       f"{self._remaining}", "ramblock.used_length", self._base + p,
                       f"<= {self._remaining} (MEM_SIZE total {self._total})")
        if used == 0:
            self._fail(f"block {name!r} has used_length 0", "ramblock.used_length",
                       self._base + p, "> 0")
        if self.mapped_ram and used & self._mask:
            self._fail(f"block {name!r} used_length 0x{used:x} is not a page multiple",
                       "ramblock.used_length", self._base + p, f"a multiple of {self.page_size}")
        p += 8
        bps = addr = None
        if self.postcopy_advised and name in self._blocks_with_page_size:
            bps = self._be64(p)
            p += 8
        if C.CAP_IGNORE_SHARED in self.capabilities:
            addr = self._be64(p)
            p += 8
        mrh = None
        skip_to = None
        if self.mapped_ram:
            self._need(p, MappedRamHeader.SIZE)
            mrh = MappedRamHeader.parse(self._buf, p)
            mrh.check(used, self._base + p, self.page_size)
            p += MappedRamHeader.SIZE
            skip_to = mrh.pages_offset + used if not mrh.ignored else None
        blk = RamBlock(name, used, bps, addr, mrh, self._base + p0)
        self._block_list.append(blk)
        self.blocks[name] = blk
        self._remaining -= used
        self._pos = p
        if self._remaining == 0:
            self._out.append(RamBlocks(tuple(self._block_list)))
            nxt = State.RAM
        else:
            nxt = State.BLOCKS
        if skip_to is not None:
            self._skip_to = skip_to
            self._after_skip = nxt
            self._go(State.SKIP)
        else:
            self._go(nxt)
        return True

    def _skip(self) -> bool:
        cur = self._base + self._pos
        if cur >= self._skip_to:
            self._go(self._after_skip)
            return True
        avail = len(self._buf) - self._pos
        if avail == 0:
            raise _NeedMore
        self._pos += min(avail, self._skip_to - cur)
        return True

    def _ramtop(self) -> bool:
        p = self._pos
        t = self._u8(p)
        sid_ram = self.ram_section_id
        if t in (C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END):
            sid = self._be32(p + 1)
            if sid != sid_ram:
                self._fail(f"section id {sid} interleaved with RAM sections (not an iterable "
                           "vmsnap supports: only 'ram' may be iterative)", "section.id",
                           self._base + p + 1, f"ram section id {sid_ram}")
            self._pos = p + 5
            if t == C.QEMU_VM_SECTION_PART:
                self._section_kind = "part"
                self._out.append(SectionPart(sid))
            else:
                self._section_kind = "end"
                self._out.append(SectionEnd(sid))
            self._go(State.RAM)
            return True
        if t == C.QEMU_VM_COMMAND:
            self._command(p)
            return True
        if t == C.QEMU_VM_SECTION_FULL:
            # QEMU's background-snapshot never sends a RAM END section: after the last RAM
            # PART comes the device state it captured when the save began.
            self._out.append(RamEnd())
            self._go(State.DEVICE)
            return True
        if t == C.QEMU_VM_SECTION_START:
            name = self._section_name(p)
            self._fail(f"START section {name!r} before the RAM END section (other "
                       "iterable/device sections interleaved with RAM are not supported)",
                       "section.idstr", self._base + p, "RAM PART/END or COMMAND")
        self._fail(f"unexpected record type 0x{t:02x} between RAM sections", "record.type",
                   self._base + p, "PART (0x02), END (0x03) or COMMAND (0x08)")
        return False

    def _eos_footer(self, p: int) -> None:
        """p points after the EOS word; read the footer and finish the section."""
        self._need(p, 5)
        if self._buf[p] != C.QEMU_VM_SECTION_FOOTER:
            self._fail(f"missing section footer (byte 0x{self._buf[p]:02x})",
                       "section.footer", self._base + p, "0x7e")
        sid = BE32.unpack_from(self._buf, p + 1)[0]
        if sid != self.ram_section_id:
            self._fail(f"footer section id {sid}", "section.footer.id", self._base + p + 1,
                       str(self.ram_section_id))
        self._pos = p + 5
        if not self._eos_sent:
            self._out.append(RamEos(self._section_kind))
        self._eos_sent = False
        if self._section_kind == "end":
            self._out.append(RamEnd())
            self._go(State.DEVICE)
        else:
            self._go(State.RAMTOP)

    def _record_block(self, p: int, flags: int) -> tuple[RamBlock, int, bool]:
        if flags & C.RAM_SAVE_FLAG_CONTINUE:
            if self._last_block is None:
                self._fail("CONTINUE record without a previous block", "ram.flags",
                           self._base + p, "an idstr (CONTINUE clear)")
            return self._last_block, p + 8, True
        name, q = self._counted(p + 8, "ram.idstr")
        blk = self.blocks.get(name)
        if blk is None:
            self._fail(f"unknown RAMBlock {name!r}", "ram.idstr", self._base + p + 8,
                       "a block listed in MEM_SIZE")
        return blk, q, False

    def _check_offset(self, blk: RamBlock, off: int, at: int) -> None:
        if off + self.page_size > blk.used_length:
            self._fail(f"page offset 0x{off:x} outside block {blk.name!r}", "ram.offset",
                       at, f"< used_length 0x{blk.used_length:x}")

    def _ram_record(self) -> bool:
        p = self._pos
        a = self._be64(p)
        flags = a & self._mask
        kind = flags & ~C.RAM_SAVE_FLAG_CONTINUE
        if kind == C.RAM_SAVE_FLAG_PAGE:
            if self.mapped_ram:
                self._fail("PAGE record in a mapped-ram stream", "ram.flags", self._base + p,
                           "EOS only")
            blk, q, cont = self._record_block(p, flags)
            self._check_offset(blk, a & ~self._mask, self._base + p)
            if cont and self.direct_pages and self._at_page_run():
                raise _NeedMore  # the caller reads these (page_run)
            self._need(q, self.page_size)
            self._page_run(p, blk, a & ~self._mask, q, cont)
            return True
        if kind == C.RAM_SAVE_FLAG_ZERO:
            if self.mapped_ram:
                self._fail("ZERO record in a mapped-ram stream", "ram.flags", self._base + p,
                           "EOS only")
            blk, q, cont = self._record_block(p, flags)
            fill = self._u8(q)
            self._check_offset(blk, a & ~self._mask, self._base + p)
            self._zero_run(p, blk, a & ~self._mask, q, fill, cont)
            return True
        if flags == C.RAM_SAVE_FLAG_EOS:
            if a & ~self._mask:
                self._fail(f"EOS record with address bits 0x{a:x}", "ram.eos", self._base + p,
                           "0x10")
            if not self._eos_sent:
                # A sync marker in multifd per-section mode: QEMU acts on the EOS word
                # itself, and a source may hold the footer back until the channels drain.
                self._out.append(RamEos(self._section_kind))
                self._eos_sent = True
            self._eos_footer(p + 8)
            return True
        if flags == C.RAM_SAVE_FLAG_MULTIFD_FLUSH and self._mask >= flags:
            if a & ~self._mask or self.mapped_ram:
                self._fail(f"bad MULTIFD_FLUSH record 0x{a:x}", "ram.flags", self._base + p,
                           "0x200 (not with mapped-ram)")
            self._pos = p + 8
            self._out.append(MultifdFlush())
            return True
        for bit, what in (
            (C.RAM_SAVE_FLAG_XBZRLE, "XBZRLE (0x40) pages are not supported: disable the "
                                     "xbzrle capability"),
            (C.RAM_SAVE_FLAG_COMPRESS_PAGE, "COMPRESS_PAGE (0x100) pages are not supported: "
                                            "disable the compress capability"),
            (C.RAM_SAVE_FLAG_HOOK, "HOOK (0x80) records (RDMA) are not supported"),
        ):
            if kind == bit:
                self._fail(what, "ram.flags", self._base + p, "PAGE, ZERO, EOS or MULTIFD_FLUSH")
        if kind == C.RAM_SAVE_FLAG_MEM_SIZE:
            self._fail("MEM_SIZE record after the block list", "ram.flags", self._base + p,
                       "PAGE, ZERO, EOS or MULTIFD_FLUSH")
        self._fail(f"unknown RAM record flags 0x{flags:x}", "ram.flags", self._base + p,
                   "PAGE, ZERO, EOS or MULTIFD_FLUSH")
        return False

    def _page_run(self, p: int, blk: RamBlock, off0: int, q: int, cont: bool) -> None:
        """Batch of PAGE records: the first at p (data at q), then PAGE|CONTINUE records."""
        buf = self._buf
        ps = self.page_size
        stride = ps + 8
        r = q + ps  # start of the run of CONTINUE records
        n = 0 if self.direct_pages else (len(buf) - r) // stride
        k = 0
        if n:
            hdr = np.ndarray((n,), dtype=">u8", buffer=buf, offset=r, strides=(stride,))
            # a record past the block's end is the next one _ram_record parses: it fails
            k = leading_pages(hdr, blk.used_length, ps)
        offsets = np.empty(k + 1, dtype=np.uint64)
        offsets[0] = off0
        data = np.empty((k + 1) * ps, dtype=np.uint8)
        data[:ps] = np.frombuffer(buf, dtype=np.uint8, count=ps, offset=q)
        if k:
            np.bitwise_and(hdr[:k], np.uint64(~self._mask & 0xFFFFFFFFFFFFFFFF),
                           out=offsets[1:])
            pages = np.ndarray((k, ps), dtype=np.uint8, buffer=buf, offset=r + 8,
                               strides=(stride, 1))
            data[ps:].reshape(k, ps)[...] = pages
        self._pos = r + k * stride
        self._last_block = blk
        self._out.append(Pages(blk.name, offsets, data.data, cont, self._base + p))

    def _zero_run(self, p: int, blk: RamBlock, off0: int, q: int, fill: int,
                  cont: bool) -> None:
        buf = self._buf
        stride = 9
        r = q + 1
        n = min((len(buf) - r) // stride, _ZERO_SCAN)
        k = 0
        if n:
            hdr = np.ndarray((n,), dtype=">u8", buffer=buf, offset=r, strides=(stride,))
            fills = np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=r + 8,
                               strides=(stride,))
            bad = np.flatnonzero(
                ((hdr & np.uint64(self._mask))
                 != np.uint64(C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE))
                | (fills != fill)
            )
            k = int(bad[0]) if bad.size else n
        offsets = np.empty(k + 1, dtype=np.uint64)
        offsets[0] = off0
        if k:
            np.bitwise_and(hdr[:k], np.uint64(~self._mask & 0xFFFFFFFFFFFFFFFF),
                           out=offsets[1:])
            over = np.flatnonzero(offsets[1:] > np.uint64(blk.used_length - self.page_size))
            if over.size:
                i = int(over[0])
                self._check_offset(blk, int(offsets[1 + i]), self._base + r + i * stride)
        self._pos = r + k * stride
        self._last_block = blk
        self._out.append(ZeroPages(blk.name, offsets, fill, cont, self._base + p))

    # ------------------------------------------------------------------ device state
    def _device(self) -> bool:
        p = self._pos
        if p >= len(self._buf):
            raise _NeedMore
        chunk = bytes(self._buf[p:])
        self._pos = len(self._buf)
        self._out.append(DeviceState(chunk))
        self._track_tail(chunk)
        vm = self._trailer()
        if vm is not None:
            self._finish(vm)
        return True

    def _track_tail(self, chunk: bytes) -> None:
        """Keep the suffix that could hold ``00 06 be32(L) JSON``: JSON has no NUL, so
        the bytes from 6 before the last NUL on (bounded by the vmdesc cap)."""
        z = chunk.rfind(b"\x00")
        if z >= 6:
            tail = bytearray(chunk[z - 6:])
        else:
            tail = self._tail
            tail += chunk
            zz = tail.rfind(b"\x00")
            if zz > 6:
                del tail[: zz - 6]
            if len(tail) > self._max_vmdesc + 16:  # no trailer can start this far back
                del tail[:-6]
        self._tail = tail

    def _trailer(self) -> bytes | None:
        """Return the vmdesc JSON if the bytes seen end with 00 06 be32(L) JSON(L)."""
        j = find_vmdesc(self._tail, self._max_vmdesc)
        return None if j is None else bytes(self._tail[j + 5:])

    def _finish(self, vmdesc: bytes | None) -> None:
        self.end = StreamEnd(vmdesc, self._base + self._pos)
        self._out.append(self.end)
        self._go(State.END)
        self._tail = bytearray()

    def _device_close(self) -> None:
        vm = self._trailer()
        if vm is not None:
            self._finish(vm)
        elif self._tail[-1:] == b"\x00":
            self._finish(None)
        else:
            self._fail("device state does not end with EOF (0x00) or a vmdesc trailer",
                       "device_state", self.offset, "0x00 [0x06 be32 len JSON]")


#: What each state parses: one step, True if it consumed input or changed state.
_STEPS: dict[State, Callable[[StreamDecoder], bool]] = {
    State.HEADER: StreamDecoder._header,
    State.CONFIG: StreamDecoder._config,
    State.TOP: StreamDecoder._top,
    State.PRELUDE: StreamDecoder._prelude,
    State.MEMSIZE: StreamDecoder._memsize,
    State.BLOCKS: StreamDecoder._block,
    State.SKIP: StreamDecoder._skip,
    State.RAM: StreamDecoder._ram_record,
    State.RAMTOP: StreamDecoder._ramtop,
    State.DEVICE: StreamDecoder._device,
}
