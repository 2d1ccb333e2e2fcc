"""vmsnap: save a running QEMU VM to a fixed-offset (mapped-ram) file and restore it, fast.

Every failure a user can cause raises a `VmsnapError` subclass (see `vmsnap.errors`). Logs go
to module loggers under "vmsnap" (debug: QMP commands, capabilities, channels, sync epochs,
I/O fallbacks); the package adds only a NullHandler, so configure logging to see them.
"""

import logging

__version__ = "0.1.0"

from .api import open as open  # noqa: A004 - vmsnap.open, not in __all__
from .api import restore, save
from .errors import QMPConnectError, VmsnapError
from .fileformat.errors import (
    ChecksumMismatch,
    CorruptTrailer,
    IncompleteSnapshot,
    NoCommitRecord,
    SnapshotError,
    UnsupportedVersion,
)
from .fileformat.reader import Snapshot, VerifyResult
from .io.atomic import FileLockedError
from .io.direct import IOEngineError
from .orchestration.restore import RestoreResult
from .orchestration.save import SaveResult
from .stream.errors import StreamError

logging.getLogger(__name__).addHandler(logging.NullHandler())

# `open` is vmsnap.open, never in __all__: `from vmsnap import *` must not shadow the builtin.
__all__ = [
    "ChecksumMismatch", "CorruptTrailer", "FileLockedError", "IOEngineError",
    "IncompleteSnapshot", "NoCommitRecord", "QMPConnectError", "RestoreResult", "SaveResult",
    "Snapshot", "SnapshotError", "StreamError", "UnsupportedVersion", "VerifyResult",
    "VmsnapError", "restore", "save",
]
