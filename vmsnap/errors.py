"""The one exception family: every failure a user can cause derives from `VmsnapError`.

A leaf module (it imports nothing from vmsnap), so the codec and the I/O engine can base
their errors on it without importing anything above them. The specific classes live with
the code that raises them and are all exported from `vmsnap`:

    VmsnapError
    ├── StreamError (also ValueError)        malformed/unsupported migration stream
    ├── SnapshotError (also ValueError)      malformed, incomplete or corrupt snapshot file
    │   ├── NoCommitRecord, CorruptTrailer (UnsupportedVersion), IncompleteSnapshot
    │   └── ChecksumMismatch                 a page or stream range fails its xxh3
    ├── IOEngineError (also OSError)         I/O the engine cannot repair
    ├── FileLockedError (also OSError)       another process writes the same file
    ├── TargetError (also OSError)           an rbd:/s3:// target cannot be reached or used
    ├── QMPConnectError (also ConnectionError)  no QMP at the given address
    ├── QmpCommandError                      QEMU refused a command (its own reason)
    └── QemuGoneError                        QEMU's monitor closed (it quit or died)

`except vmsnap.VmsnapError` catches all of them; the second bases keep older
`except ValueError` / `except OSError` handlers working.
"""

from __future__ import annotations

import sys
from pathlib import Path


class VmsnapError(Exception):
    """A failure with a message fit for one line on stderr."""


class QMPConnectError(VmsnapError, ConnectionError):
    """Nothing answers QMP at the given address."""


#: What the CLI reports as one line (never a traceback): our family, and the OS's own
#: errors about user paths (missing file, permission, disk full, broken pipe), and running
#: out of memory (a file that claims more than this host can index: one line, not a trace).
USER_ERRORS = (VmsnapError, OSError, MemoryError)


def interrupted(err: BaseException) -> bool:
    """Whether `err` is how SIGINT/SIGTERM reach an operation: KeyboardInterrupt, or an
    asyncio cancellation (asyncio is not loaded for this: a command that has not loaded it,
    e.g. a lazy restore before its QEMU starts, has no cancellation either)."""
    aio = sys.modules.get("asyncio")
    return isinstance(err, KeyboardInterrupt) or (
        aio is not None and isinstance(err, aio.CancelledError))


def one_line(err: BaseException) -> str:
    """`err` as one line: whitespace collapsed; an OSError names its file; a cancellation
    (how SIGINT/SIGTERM reach an operation) says so rather than "CancelledError"."""
    if interrupted(err):  # a KeyboardInterrupt may say what the interrupt left behind
        return "interrupted" + (f": {err}" if isinstance(err, KeyboardInterrupt) and str(err)
                                else "")
    if isinstance(err, MemoryError):
        return "out of memory" + (f": {err}" if str(err) else "")
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror or err}: {Path(err.filename)}"
    return squash(str(err)) or type(err).__name__


def squash(text: str) -> str:
    """`text` on one line: every run of whitespace (newlines too) becomes one space."""
    return " ".join(text.split())
