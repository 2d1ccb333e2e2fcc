"""Save modes: what each one asks of QEMU, and what it checks before the guest is touched.

- paused: vmsnap stops the guest, then QEMU sends RAM once; the file holds RAM at the stop.
- live: pre-copy while the guest runs, QEMU stops it for the last round (see converge.py);
  the file holds RAM as it was at the end of the save.
- background: QEMU's `background-snapshot` (QEMU >= 6.0, userfaultfd write-protect): QEMU
  stops the guest for a moment to capture device state, write-protects guest RAM and resumes
  it; a page is copied out before the guest's first write to it, so the file holds RAM as it
  was when the save began. QEMU refuses multifd with it: one stream.
"""

from __future__ import annotations

import enum
from typing import Any

from ..errors import VmsnapError
from ..stream.constants import CAP_IGNORE_SHARED, CAP_MAPPED_RAM
from . import qmp as qmpmod
from .qmp import Monitor
from .rendezvous import process_ids


class SaveMode(enum.Enum):
    PAUSED = "paused"
    LIVE = "live"
    BACKGROUND = "background"


class After(enum.StrEnum):
    """What a save does with the VM once its file is committed."""

    PAUSE = "pause"  # leave it paused
    RESUME = "resume"  # a checkpoint: the VM goes on
    QUIT = "quit"  # end QEMU

    @classmethod
    def parse(cls, value: After | str | None) -> After | None:
        """`value` as an After (None stays None: `then` picks); ValueError for others."""
        try:
            return None if value is None else cls(value)
        except ValueError:
            raise ValueError(f"after must be pause, resume or quit, not {value!r}") from None

    @classmethod
    def then(cls, value: After | str | None, mode: SaveMode) -> After:
        """`value`, or by default PAUSE, except that a background save keeps the VM's run
        state (RESUME)."""
        return cls.parse(value) or (cls.RESUME if mode is SaveMode.BACKGROUND else cls.PAUSE)


#: Capabilities whose streams vmsnap cannot store; switched off for the save, then restored.
INCOMPATIBLE_CAPS = ("xbzrle", "compress", "postcopy-ram", "postcopy-preempt", "multifd",
                     CAP_MAPPED_RAM, CAP_IGNORE_SHARED, "zero-blocks", "release-ram")
#: What QEMU refuses together with background-snapshot (its check_caps_background_snapshot,
#: 6.0 to 10.x): all off for a background save, then restored.
BACKGROUND_CLASHES = ("postcopy-ram", "dirty-bitmaps", "postcopy-blocktime",
                      "late-block-activate", "return-path", "multifd",
                      "pause-before-switchover", "auto-converge", "release-ram", "rdma-pin-all",
                      "compress", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send")
BACKGROUND = "background-snapshot"
BACKGROUND_SINCE = (6, 0)
#: What QEMU needs for background snapshots and postcopy, and how a non-root QEMU gets it.
USERFAULTFD = ("userfaultfd, which a QEMU not running as root gets only with sysctl "
               "vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd")
#: Local saves should not be throttled by QEMU's default 128 MiB/s.
UNLIMITED_BANDWIDTH = 1 << 40


def select(live: bool, background: bool) -> SaveMode:
    if live and background:
        raise VmsnapError("choose --live or --background, not both")
    return SaveMode.BACKGROUND if background else SaveMode.LIVE if live else SaveMode.PAUSED


def channels_for(mode: SaveMode, channels: int | None) -> int | None:
    """A background save is one stream: the default becomes 0, an explicit N > 0 is refused."""
    if mode is not SaveMode.BACKGROUND:
        return channels
    if channels:
        raise VmsnapError("--background saves over one stream (QEMU refuses multifd with "
                          "background-snapshot): drop --channels or use --channels 0")
    return 0


def clean_capabilities() -> dict[str, bool]:
    """What every migration vmsnap runs starts from: the capabilities that would change the
    stream off, QEMU's migration events on (qmp.watch waits on them)."""
    return {**dict.fromkeys(INCOMPATIBLE_CAPS, False), qmpmod.CAP_EVENTS: True}


def capabilities(mode: SaveMode, channels: int) -> dict[str, bool]:
    caps = clean_capabilities()
    if mode is SaveMode.BACKGROUND:
        return {**caps, **dict.fromkeys(BACKGROUND_CLASHES, False), BACKGROUND: True}
    return {**caps, BACKGROUND: False, "auto-converge": mode is SaveMode.LIVE,
            "multifd": channels > 0}


def base_parameters(channels: int) -> dict[str, Any]:
    params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH}
    if channels:
        params["multifd-channels"] = channels
    return params


async def apply_capabilities(client: Monitor, peer: qmpmod.Peer, mode: SaveMode,
                             channels: int, extra: dict[str, bool] | None = None
                             ) -> dict[str, bool]:
    """Set the mode's capabilities; return the previous values to restore afterwards.

    For a background save this is the probe: QEMU checks there that the host kernel can
    write-protect this guest's memory (userfaultfd) and says why not, before anything runs."""
    known = await qmpmod.capabilities(client)
    if mode is SaveMode.BACKGROUND:
        if BACKGROUND not in known:
            raise VmsnapError(f"QEMU {peer.version_text} cannot save in the background: "
                              f"background-snapshot needs QEMU >= "
                              f"{'.'.join(map(str, BACKGROUND_SINCE))}")
    try:
        return await qmpmod.set_capabilities(client, {**capabilities(mode, channels),
                                                      **(extra or {})}, known)
    except qmpmod.QmpCommandError as err:
        why = err.desc
        if mode is SaveMode.BACKGROUND:
            ids = process_ids(peer.pid) if peer.pid else None
            if "kernel" in why and (ids is None or ids[0] != 0):  # not root, or unknown
                why += f" (write-protecting guest RAM needs {USERFAULTFD})"
            raise VmsnapError(f"cannot save in the background: {why}") from err
        raise VmsnapError(f"QEMU refused the migration capabilities: {why}") from err

