"""Exec a command inside the QEMU 10 chroot (started by `unshare --mount`).

The caller starts us in a fresh private mount namespace, so the bind mounts made here vanish
with the process: nothing leaks into the host's mount table, whatever happens to the test.
Each bound directory appears at the same absolute path inside the chroot, so paths the test
passes to QEMU (sockets, files) mean the same thing on both sides.

Usage: python -I -S chroot_exec.py ROOT [--bind DIR]... -- COMMAND [ARG]...

Standard library only, run by path without site (testbed.qemu): it stands between a
restore's command and QEMU's start, which a lazy restore's time to running includes (the
mounts are mount(2) calls, not a `mount` process each).
"""

import ctypes
import os
import sys
import warnings  # noqa: F401 - os.execvp loads it, from a library the chroot does not have

_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"chroot_exec: mount {source} on {target}: {os.strerror(err)}")


def _bind(path: str, root: str) -> None:
    """Make `path` visible at the same path inside `root`, even if it runs through a
    symlink on the host (a worktree's build/ pointing at the main checkout's)."""
    target = os.path.join(root, os.path.abspath(path).lstrip("/"))
    os.makedirs(target, exist_ok=True)
    _mount(os.path.realpath(path), target, _MS_BIND)


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    root, options, command = argv[0], argv[1:sep], argv[sep + 1 :]
    binds = ["/dev", "/proc", "/sys"]
    while options:
        flag, directory, *options = options
        if flag != "--bind":
            raise SystemExit(f"chroot_exec: unknown option {flag}")
        binds.append(directory)
    _mount("none", "/", _MS_REC | _MS_PRIVATE)
    for source in binds:
        _bind(source, root)
    os.chroot(root)
    os.chdir("/")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
