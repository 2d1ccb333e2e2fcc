"""Exec a command inside the QEMU 10 chroot (started by `unshare --mount`).

The caller starts us in a fresh private mount namespace, so the bind mounts made here vanish
with the process: nothing leaks into the host's mount table, whatever happens to the test.
Each bound directory appears at the same absolute path inside the chroot, so paths the test
passes to QEMU (sockets, files) mean the same thing on both sides.

Usage: python -m testbed.chroot_exec ROOT [--bind DIR]... -- COMMAND [ARG]...
"""

import os
import subprocess
import sys


def _bind(path: str, root: str) -> None:
    """Make `path` visible at the same path inside `root`, even if it runs through a
    symlink on the host (a worktree's build/ pointing at the main checkout's)."""
    target = os.path.join(root, os.path.abspath(path).lstrip("/"))
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "--bind", os.path.realpath(path), target], check=True)


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    root, options, command = argv[0], argv[1:sep], argv[sep + 1 :]
    binds = ["/dev", "/proc", "/sys"]
    while options:
        flag, directory, *options = options
        if flag != "--bind":
            raise SystemExit(f"chroot_exec: unknown option {flag}")
        binds.append(directory)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for source in binds:
        _bind(source, root)
    os.chroot(root)
    os.chdir("/")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
