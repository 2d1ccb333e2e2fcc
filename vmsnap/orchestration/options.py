"""Values of command-line options that the CLI offers before it loads the orchestration
(which loads numpy and QEMU's QMP library: the `vmsnap` command loads them only for the verb
it runs, and a restore that launches QEMU starts it first, see relaunch.start_qemu)."""

from __future__ import annotations

import os

from ..errors import VmsnapError

#: when a save's page checksums are added where QEMU wrote the pages itself (`--seal`)
SEAL_WHEN = ("now", "background", "later")

#: most multifd channels (`--channels`)
MAX_CHANNELS = 64


def check_channels(channels: int | None) -> int:
    """The multifd channel count to use: as asked (0 = one plain stream, up to 64) or, when
    not given, one per CPU, at least 2, at most 8 (QEMU 7.2 and later all have multifd)."""
    if channels is None:
        return max(2, min(8, os.cpu_count() or 2))
    if not 0 <= channels <= MAX_CHANNELS:
        raise VmsnapError(f"--channels must be 0..{MAX_CHANNELS}, not {channels}")
    return channels
