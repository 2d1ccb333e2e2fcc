"""Encoder: functions returning the bytes of migration-stream records.

Inverse of :mod:`vmsnap.stream.decoder` (``decode(encode(x)) == x``). Page records are
built in bulk with numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from . import constants as C
from .constants import BE16, BE32, BE64
from .events import Bytes, RamBlock


def counted(s: str | bytes) -> bytes:
    b = s.encode("ascii") if isinstance(s, str) else bytes(s)
    if not 1 <= len(b) <= 255:
        raise ValueError(f"counted string must be 1..255 bytes: {b!r}")
    return bytes([len(b)]) + b


def header(version: int = C.QEMU_VM_FILE_VERSION) -> bytes:
    return BE32.pack(C.QEMU_VM_FILE_MAGIC) + BE32.pack(version)


def subsection(name: str, version_id: int, fields: bytes) -> bytes:
    return bytes([C.QEMU_VM_SUBSECTION]) + counted(name) + BE32.pack(version_id) + fields


def configuration(
    machine: str,
    capabilities: Sequence[str] = (),
    *,
    page_bits: int | None = None,
    uuid: bytes | None = None,
) -> bytes:
    """CONFIGURATION record; subsections in QEMU's order (page bits, capabilities, uuid)."""
    m = machine.encode("ascii")
    out = bytes([C.QEMU_VM_CONFIGURATION]) + BE32.pack(len(m)) + m
    if page_bits is not None:
        out += subsection(C.PAGE_BITS_SUBSECTION, 1, BE32.pack(page_bits))
    if capabilities:
        body = BE32.pack(len(capabilities)) + b"".join(counted(c) for c in capabilities)
        out += subsection(C.CAPS_SUBSECTION, 1, body)
    if uuid is not None:
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        out += subsection(C.UUID_SUBSECTION, 1, bytes(uuid))
    return out


def command(cmd: int, payload: bytes = b"") -> bytes:
    return bytes([C.QEMU_VM_COMMAND]) + BE16.pack(cmd) + BE16.pack(len(payload)) + payload


def section_start(sid: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    return (bytes([C.QEMU_VM_SECTION_START]) + BE32.pack(sid) + counted(idstr)
            + BE32.pack(instance_id) + BE32.pack(version_id))


def section_part(sid: int) -> bytes:
    return bytes([C.QEMU_VM_SECTION_PART]) + BE32.pack(sid)


def section_end(sid: int) -> bytes:
    return bytes([C.QEMU_VM_SECTION_END]) + BE32.pack(sid)


def footer(sid: int) -> bytes:
    return bytes([C.QEMU_VM_SECTION_FOOTER]) + BE32.pack(sid)


def eos() -> bytes:
    return BE64.pack(C.RAM_SAVE_FLAG_EOS)


def multifd_flush() -> bytes:
    return BE64.pack(C.RAM_SAVE_FLAG_MULTIFD_FLUSH)


def eof() -> bytes:
    return bytes([C.QEMU_VM_EOF])


def vmdescription(json_bytes: bytes) -> bytes:
    return bytes([C.QEMU_VM_VMDESCRIPTION]) + BE32.pack(len(json_bytes)) + json_bytes


def ramblock_entry(b: RamBlock, *, mapped_ram: bool = False) -> bytes:
    out = counted(b.name) + BE64.pack(b.used_length)
    if b.page_size is not None:
        out += BE64.pack(b.page_size)
    if b.addr is not None:
        out += BE64.pack(b.addr)
    if mapped_ram:
        if b.mapped_ram is None:
            raise ValueError(f"block {b.name!r} has no MappedRamHeader")
        out += b.mapped_ram.pack()
    return out


def mem_size(blocks: Iterable[RamBlock], page_size: int = C.TARGET_PAGE_SIZE) -> bytes:
    total = sum(b.used_length for b in blocks)
    if total & (page_size - 1):
        raise ValueError("MEM_SIZE total must be page aligned")
    return BE64.pack(total | C.RAM_SAVE_FLAG_MEM_SIZE)


def ram_start(sid: int, blocks: Sequence[RamBlock], mapped_ram: bool = False,
              page_size: int = C.TARGET_PAGE_SIZE) -> bytes:
    """RAM START section header + MEM_SIZE block list (no EOS/footer).

    With ``mapped_ram`` each entry carries its MappedRamHeader back to back; the jumps
    to ``pages_offset + used_length`` are the caller's business (the file layout is
    :func:`vmsnap.fileformat.layout.compute_layout`; each entry is written at its
    ``idstr_offset``)."""
    out = section_start(sid, "ram", C.RAM_INSTANCE_ID, C.RAM_VERSION_ID)
    out += mem_size(blocks, page_size)
    return out + b"".join(ramblock_entry(b, mapped_ram=mapped_ram) for b in blocks)


def _headers(block: str, offsets: np.ndarray, flag: int, continue_: bool,
             page_size: int) -> tuple[bytes, np.ndarray]:
    offs = np.asarray(offsets, dtype=np.uint64)
    if offs.ndim != 1:
        raise ValueError("offsets must be 1-D")
    if offs.size and (offs & np.uint64(page_size - 1)).any():
        raise ValueError("offsets must be page aligned")
    words = (offs | np.uint64(flag | C.RAM_SAVE_FLAG_CONTINUE)).astype(">u8")
    first = b""
    if offs.size and not continue_:
        first = BE64.pack(int(offs[0]) | flag) + counted(block)
    return first, words


def page_record_parts(block: str, offsets: np.ndarray, pages: Bytes, continue_: bool = False,
                      page_size: int = C.TARGET_PAGE_SIZE) -> list[memoryview]:
    """PAGE records as a list of buffers, headers interleaved with views of ``pages``
    (len(offsets)*page_size bytes) — for vectored writes that never copy page data.
    The first record carries the idstr unless ``continue_``."""
    first, words = _headers(block, offsets, C.RAM_SAVE_FLAG_PAGE, continue_, page_size)
    n = words.size
    data = memoryview(pages).cast("B")
    if data.nbytes != n * page_size:
        raise ValueError(f"pages has {data.nbytes} bytes, expected {n * page_size}")
    heads = words.view(np.uint8).data
    parts: list[memoryview] = []
    for i in range(n):
        parts.append(memoryview(first) if i == 0 and first else heads[8 * i:8 * i + 8])
        parts.append(data[i * page_size:(i + 1) * page_size])
    return parts


def page_records_packed(block: str, offsets: np.ndarray, pages: Bytes, continue_: bool = False,
                        page_size: int = C.TARGET_PAGE_SIZE) -> list[memoryview]:
    """The PAGE records of page_record_parts in one or two buffers (the first record's head
    with its idstr, then the rest), the pages copied by numpy: for small batches this costs
    less CPU than a Python-level buffer for every header and page, in the caller and in the
    vectored send."""
    first, words = _headers(block, offsets, C.RAM_SAVE_FLAG_PAGE, continue_, page_size)
    n = words.size
    data = np.frombuffer(memoryview(pages).cast("B"), np.uint8)
    if data.size != n * page_size:
        raise ValueError(f"pages has {data.size} bytes, expected {n * page_size}")
    out = np.empty((n, 8 + page_size), np.uint8)
    out[:, :8] = words.view(np.uint8).reshape(n, 8)
    out[:, 8:] = data.reshape(n, page_size)
    packed = memoryview(out).cast("B")
    return [memoryview(first), packed[8:]] if first else [packed]


def page_records(block: str, offsets: np.ndarray, pages: Bytes, continue_: bool = False,
                 page_size: int = C.TARGET_PAGE_SIZE) -> bytes:
    """PAGE records for ``offsets`` with page bytes ``pages`` (len(offsets)*page_size
    bytes, any buffer). The first record carries the idstr unless ``continue_``."""
    return b"".join(page_record_parts(block, offsets, pages, continue_, page_size))


def zero_records(block: str, offsets: np.ndarray, fill: int = 0, continue_: bool = False,
                 page_size: int = C.TARGET_PAGE_SIZE) -> bytes:
    """ZERO records (8-byte word [+ idstr] + fill byte)."""
    first, words = _headers(block, offsets, C.RAM_SAVE_FLAG_ZERO, continue_, page_size)
    n = words.size
    if n == 0:
        return b""
    rec = np.empty((n, 9), dtype=np.uint8)
    rec[:, :8] = words.view(np.uint8).reshape(n, 8)
    rec[:, 8] = fill
    if first:
        return first + bytes([fill]) + rec[1:].tobytes()
    return rec.tobytes()
