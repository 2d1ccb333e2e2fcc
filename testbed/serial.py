"""The guest's serial console, reached through QEMU's unix-socket chardev."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path


class SerialTimeout(TimeoutError):
    pass


class SerialConsole:
    """Collects everything the guest prints; lets a test wait for a pattern or send a line."""

    def __init__(self, path: Path, connect_timeout: float = 10.0):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self._text = ""
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                else:
                    self._text += data.decode("latin-1")
                self._cond.notify_all()
            if not data:
                return

    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    def mark(self) -> int:
        """Position to wait from, so a later wait ignores what was printed before."""
        return len(self.text)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Wait until `pattern` (a regex) appears in the output after `start`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._text, start)
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    tail = self._text[-300:].replace("\r", "")
                    why = "console closed" if self._closed else f"{timeout:.0f}s timeout"
                    raise SerialTimeout(f"serial: {pattern!r} not seen ({why}); last: {tail!r}")
                self._cond.wait(min(remaining, 0.5))

    def send_line(self, line: str) -> None:
        self._sock.sendall(line.encode() + b"\n")

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)
