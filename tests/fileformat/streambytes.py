"""Tiny stream-byte builders for tests (stand-in until vmsnap.stream's encoder exists)."""

from __future__ import annotations

import json
import struct


def counted(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


def prefix(machine: str, blocks: list[tuple[str, int]], sid: int = 1,
           caps: tuple[str, ...] = ("mapped-ram",)) -> bytes:
    m = machine.encode()
    out = struct.pack(">II", 0x5145564D, 3) + b"\x07" + struct.pack(">I", len(m)) + m
    out += b"\x05" + counted("configuration/capabilities") + struct.pack(">II", 1, len(caps))
    out += b"".join(counted(c) for c in caps)
    out += b"\x01" + struct.pack(">I", sid) + counted("ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", sum(n for _, n in blocks) | 0x04)
    return out


def tail(sid: int = 1, device_state: bytes = b"\x04fake-device-state") -> bytes:
    eos = struct.pack(">Q", 0x10)
    out = eos + b"\x7e" + struct.pack(">I", sid)
    out += b"\x03" + struct.pack(">I", sid) + eos + b"\x7e" + struct.pack(">I", sid)
    out += device_state + b"\x00"
    js = json.dumps({"page_size": 4096, "devices": []}).encode()
    return out + b"\x06" + struct.pack(">I", len(js)) + js
