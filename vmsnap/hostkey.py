"""The host key: a secret that makes "this host wrote this file" checkable.

vmsnap signs the trailer of every file it saves with an HMAC-SHA256 under this key, so a
relaunch can tell its own files (whose stored command line it may run) from files made
elsewhere or altered since. The key is 32 random bytes in a 0600 file, created on first
use: root's under /var/lib/vmsnap, a user's under $XDG_STATE_HOME/vmsnap (default
~/.local/state/vmsnap); $VMSNAP_KEY_DIR overrides the directory (tests use a private one).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .errors import VmsnapError
from .fileformat.trailer import Trailer, key_id

KEY_FILE = "host.key"
KEY_SIZE = 32
KEY_DIR_ENV = "VMSNAP_KEY_DIR"


def key_dir() -> str:
    """Where this user's host key lives."""
    if os.environ.get(KEY_DIR_ENV):
        return os.path.abspath(os.environ[KEY_DIR_ENV])
    if os.geteuid() == 0:
        return "/var/lib/vmsnap"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "vmsnap")


def load_key() -> bytes | None:
    """This host's key, or None if none was made yet. Refuses a key file others could
    read or replace: a leaked key lets anyone sign command lines this host would run."""
    path = os.path.join(key_dir(), KEY_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise VmsnapError(f"cannot read host key {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise VmsnapError(f"host key {path} must be a regular file owned by uid "
                              f"{os.geteuid()} with mode 0600")
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise VmsnapError(f"host key {path} is not {KEY_SIZE} bytes long")
    return key


def load_or_create_key() -> bytes:
    """This host's key, made on first use (0700 directory, 0600 file, written whole before
    it appears under its name, so a concurrent first use reads either nothing or all)."""
    key = load_key()
    if key is not None:
        return key
    directory = key_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, os.urandom(KEY_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, os.path.join(directory, KEY_FILE))  # fails if another won the race
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as err:
        raise VmsnapError(f"cannot create host key in {directory}: {err.strerror} "
                          f"(set {KEY_DIR_ENV} to a writable directory)") from None
    key = load_key()
    assert key is not None
    return key


@dataclass(frozen=True)
class Trust:
    """Whether a file's stored command line may run on this host, and why."""

    trusted: bool
    reason: str


def trust_of(trailer: Trailer | None, *, tables: bool = True) -> Trust:
    """Trusted only when `trailer` carries a valid signature under this host's key.
    `tables`: and its checksum tables are the signed ones (waits for them; CorruptTrailer
    if not); False: the signature of the metadata alone, all that running the stored
    command line needs (the tables are refused wherever they are used unless they are the
    signed ones, see fileformat.trailer)."""
    sig = trailer.signature if trailer else None
    if sig is None:
        return Trust(False, "not signed (made elsewhere, by `vmsnap receive` or by QEMU)")
    key = load_key()
    if key is None or key_id(key) != sig.key_id:
        return Trust(False, f"signed by another host or user (key {sig.key_id})")
    if not sig.valid(key):
        return Trust(False, "signature does not match: the file was altered after it was saved")
    if tables and trailer is not None:
        trailer.check()
    return Trust(True, "signed by this host's key")
