"""vmsnap: save a running QEMU VM to a fixed-offset (mapped-ram) file and restore it, fast.

Every failure a user can cause raises a `VmsnapError` subclass (see `vmsnap.errors`). Logs go
to module loggers under "vmsnap" (debug: QMP commands, capabilities, channels, sync epochs,
I/O fallbacks); the package adds only a NullHandler, so configure logging to see them.

The names below load on first use: `import vmsnap` stays cheap, so the `vmsnap` command
takes SIGINT over before its heavy imports (vmsnap.__main__).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .exports import load_export

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "open": ".api", "restore": ".api", "save": ".api", "info": ".api", "verify": ".api",
    "receive": ".api", "send": ".api", "seal": ".api", "import_stream": ".api",
    "export_image": ".api",
    "QMPConnectError": ".errors", "VmsnapError": ".errors", "After": ".orchestration.modes",
    "ChecksumMismatch": ".fileformat.errors", "CorruptTrailer": ".fileformat.errors",
    "IncompleteSnapshot": ".fileformat.errors", "NoCommitRecord": ".fileformat.errors",
    "SnapshotError": ".fileformat.errors", "UnsupportedVersion": ".fileformat.errors",
    "Snapshot": ".fileformat.reader", "VerifyResult": ".fileformat.reader",
    "FileLockedError": ".io.atomic", "IOEngineError": ".io.direct",
    "QemuGoneError": ".orchestration.qmp", "QmpCommandError": ".orchestration.qmp",
    "TargetError": ".targets.base",
    "RestoreResult": ".orchestration.target", "SaveResult": ".orchestration.save",
    "LazyRestoreResult": ".orchestration.lazy", "SnapshotInfo": ".ops.info",
    "ReceiveStats": ".ops.receive", "SendStats": ".ops.send",
    "StreamError": ".stream.errors",
}

if TYPE_CHECKING:
    from .api import (
        export_image,
        import_stream,
        info,
        receive,
        restore,
        save,
        seal,
        send,
        verify,
    )
    from .api import open as open  # noqa: A004
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
    from .ops.info import SnapshotInfo
    from .ops.receive import ReceiveStats
    from .ops.send import SendStats
    from .orchestration.lazy import LazyRestoreResult
    from .orchestration.modes import After
    from .orchestration.qmp import QemuGoneError, QmpCommandError
    from .orchestration.save import SaveResult
    from .orchestration.target import RestoreResult
    from .stream.errors import StreamError
    from .targets.base import TargetError


def __getattr__(name: str) -> object:
    return load_export(__name__, _EXPORTS, globals(), name)


logging.getLogger(__name__).addHandler(logging.NullHandler())

# `open` is vmsnap.open, never in __all__: `from vmsnap import *` must not shadow the builtin.
__all__ = [
    "After", "ChecksumMismatch", "CorruptTrailer", "FileLockedError", "IOEngineError",
    "IncompleteSnapshot", "LazyRestoreResult", "NoCommitRecord", "QMPConnectError",
    "QemuGoneError", "QmpCommandError", "ReceiveStats", "RestoreResult", "SaveResult",
    "SendStats", "Snapshot", "SnapshotError", "SnapshotInfo", "StreamError", "TargetError",
    "UnsupportedVersion", "VerifyResult", "VmsnapError",
    "export_image", "import_stream", "info", "receive", "restore", "save", "seal", "send",
    "verify",
]
