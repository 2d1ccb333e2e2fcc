"""The relaunch guard: starts QEMU for vmsnap and ends it if vmsnap goes away first.

Run by vmsnap as `python -I -S guard.py SOCKET_FD PASS_FDS PROGRAM ARGV...` (PASS_FDS:
comma-separated descriptors QEMU inherits, or empty). It starts PROGRAM with ARGV on its own
stdio, writes QEMU's PID to the socket, then waits for the first of:

- "release" on the socket (the restore is done): exit 0; QEMU runs on by itself;
- end of file on the socket: vmsnap exited or was killed (even by SIGKILL, which no handler
  sees) without releasing, so QEMU waits for a stream that will never come: SIGKILL it
  (also when that happened before the PID could be written);
- QEMU's exit: exit with its status, so vmsnap sees QEMU's end as the guard's.

A parent-death signal set on QEMU itself would also kill it after a successful restore,
when vmsnap exits; the guard ends its watch instead. vmsnap starts it in a session of its
own, so a signal to vmsnap's process group does not reach it. If the program is a wrapper
that forks QEMU (rather than exec'ing it), only the wrapper is killed.

QEMU starts once this has started, so it loads built-in modules only: _signal and _socket,
the C modules under signal and socket, without the enums those two build, and posix_spawn
rather than subprocess. From its exec to QEMU's: ~9 ms, was ~20 ms.
"""

import _signal
import _socket
import os
import select
import sys

#: what subprocess also resets for the program it starts (Python ignores them)
DEFAULT_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)


def main(argv: list[str]) -> int:
    sock = _socket.socket(fileno=int(argv[0]))
    os.set_inheritable(sock.fileno(), False)  # QEMU gets its stdio and PASS_FDS only
    for fd in (int(fd) for fd in argv[1].split(",") if fd):
        os.set_inheritable(fd, True)
    try:
        pid = os.posix_spawnp(argv[2], argv[3:], os.environ, setsigdef=DEFAULT_SIGNALS)
    except OSError as err:
        print(f"cannot start {argv[2]}: {err.strerror}", file=sys.stderr, flush=True)
        return 127
    _signal.signal(_signal.SIGTERM, lambda *_: sock.shutdown(_socket.SHUT_RDWR))
    try:
        sock.sendall(f"{pid}\n".encode())
    except OSError:  # vmsnap let go before QEMU had started (a restore failing at once)
        return end(pid)
    qemu = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([sock.fileno(), qemu], [], [])
        if qemu in ready:
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return 128 - code if code < 0 else code
        try:
            message = sock.recv(64)
        except OSError:
            message = b""
        if message.startswith(b"release"):
            return 0
        if not message:
            return end(pid)


def end(pid: int) -> int:
    """SIGKILL QEMU, whose stream will never come, and reap it: the guard's status."""
    os.kill(pid, _signal.SIGKILL)
    os.waitpid(pid, 0)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
