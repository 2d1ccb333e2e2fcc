"""Progress reporting: a rich bar on a terminal, JSON lines for scripts, or nothing."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # rich is imported only when a bar is shown: `import vmsnap` stays light
    from rich.progress import Progress, TaskID


class Reporter:
    """Receives start/update/done/error from an operation and shows them to the user."""

    def __init__(self, as_json: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None, interval: float = 0.5):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._op = ""
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._failed = False
        self._lock = threading.Lock()  # updates may come from several sender threads

    def _emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "op": self._op, **fields})
        with self._lock:
            print(line, file=self.out, flush=True)

    def start(self, op: str, total: int | None = None, **fields: Any) -> None:
        self._op = op
        if self.as_json:
            self._emit("start", total=total, **fields)
        elif self.err.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(file=self.err), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(op, total=total)

    def update(self, done: int, total: int | None = None, **fields: Any) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total,
                                  description=fields.get("phase", self._op))
        elif self.as_json:
            now = time.monotonic()
            with self._lock:
                if now - self._last < self.interval:
                    return
                self._last = now
            self._emit("progress", done=done, total=total, **fields)

    def event(self, event: str, **fields: Any) -> None:
        """A milestone inside an operation (e.g. "running" during a lazy restore)."""
        if self.as_json:
            self._emit(event, **fields)

    def note(self, message: str) -> None:
        """A one-line notice for the user on stderr (and a JSON event)."""
        self.event("note", message=message)
        print(message, file=self.err, flush=True)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def done(self, **figures: Any) -> None:
        self._stop()
        if self.as_json:
            self._emit("done", **figures)

    def result(self, op: str, **fields: Any) -> None:
        """The outcome of an operation without progress (info), as its one "done" event."""
        self._op = op
        if self.as_json:
            self._emit("done", **fields)

    def error(self, message: str) -> None:
        """Report a failure (once: later calls for the same failure are ignored)."""
        self._stop()
        if self.as_json and not self._failed:
            self._emit("error", message=message)
        self._failed = True
