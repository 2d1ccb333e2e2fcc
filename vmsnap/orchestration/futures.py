"""Letting go of asyncio futures nobody will await any more, without a word from asyncio.

A future that ends with an exception nobody asked for makes asyncio print "Task exception
was never retrieved" (or "Future exception ...") with a traceback on stderr when it is
collected, after vmsnap's own one-line error. Cancelling does not prevent it: a task cut
short may end with an error of its own instead of CancelledError (a QMP query cut short by
QEMU's death ends with QemuGoneError), and a thread's future ends whenever the thread does.
"""

from __future__ import annotations

import asyncio
from typing import Any


def cancel(*futures: asyncio.Future[Any]) -> None:
    """Cancel `futures` (those not done yet) and take whatever outcome each ends with."""
    for future in futures:
        future.cancel()
        retrieve(future)


def retrieve(future: asyncio.Future[Any]) -> None:
    """Take `future`'s outcome once it has one (at once if it has): its exception, if any,
    is never reported as unretrieved; the caller reports the failure that matters."""
    if future.done():
        _consume(future)
    else:
        future.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
