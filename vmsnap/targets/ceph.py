"""One librados connection per process, configured the usual way, with client timeouts.

A full or dead OSD makes librados wait forever by default; vmsnap sets op timeouts (unless
the configuration sets its own) so a save fails with an error instead of hanging. librados
must not be used in a process forked after it connected: vmsnap only forks to exec QEMU.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

from .base import TargetError

#: seconds; VMSNAP_CEPH_TIMEOUT overrides
DEFAULT_TIMEOUT = 60

_lock = threading.Lock()
_cluster = None


def cluster() -> Any:  # rados.Rados (python3-rados has no type hints)
    """The process's connected `rados.Rados` (CEPH_CONF or the default search path,
    CEPH_ARGS for --id/--keyring)."""
    global _cluster
    with _lock:
        if _cluster is None:
            _cluster = _connect()
        return _cluster


def _connect() -> Any:
    try:
        import rados
    except ImportError:
        raise TargetError("Ceph targets need python3-rados and python3-rbd "
                          "(scripts/install.sh installs them)", errno.ENOSYS) from None
    timeout = os.environ.get("VMSNAP_CEPH_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        c = rados.Rados(conffile="")  # the default search path, which honours CEPH_CONF
    except rados.ObjectNotFound:
        raise TargetError("no Ceph configuration: set CEPH_CONF or create "
                          "/etc/ceph/ceph.conf", errno.ENOENT) from None
    try:
        c.conf_parse_env()
        for key in ("rados_osd_op_timeout", "rados_mon_op_timeout"):
            if float(c.conf_get(key) or 0) == 0:  # 0 = wait forever
                c.conf_set(key, timeout)
        c.connect(timeout=int(float(timeout)))
    except rados.Error as e:
        raise TargetError(f"cannot connect to Ceph ({_conf_name()}): {e}",
                          getattr(e, "errno", None) or errno.EIO) from None
    return c


def _conf_name() -> str:
    return os.environ.get("CEPH_CONF") or "default ceph.conf"


def ioctx(pool: str) -> Any:  # rados.Ioctx
    import rados
    try:
        return cluster().open_ioctx(pool)
    except rados.ObjectNotFound:
        raise TargetError(f"Ceph pool {pool!r} does not exist", errno.ENOENT) from None
    except rados.Error as e:
        raise TargetError(f"cannot open Ceph pool {pool!r}: {e}") from None
