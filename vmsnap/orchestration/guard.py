"""The relaunch guard: starts QEMU for vmsnap and ends it if vmsnap goes away first.

Run by vmsnap as `python -I -S guard.py SOCKET_FD PASS_FDS PROGRAM ARGV...` (standard
library only, so it starts in milliseconds; PASS_FDS: comma-separated descriptors QEMU
inherits, or empty). It starts PROGRAM with ARGV on its own stdio, writes QEMU's PID to the
socket, then waits for the first of:

- "release" on the socket (the restore is done): exit 0; QEMU runs on by itself;
- end of file on the socket: vmsnap exited or was killed (even by SIGKILL, which no handler
  sees) without releasing, so QEMU waits for a stream that will never come: SIGKILL it;
- QEMU's exit: exit with its status, so vmsnap sees QEMU's end as the guard's.

A parent-death signal set on QEMU itself would also kill it after a successful restore,
when vmsnap exits; the guard ends its watch instead. vmsnap starts it in a session of its
own, so a signal to vmsnap's process group does not reach it. If the program is a wrapper
that forks QEMU (rather than exec'ing it), only the wrapper is killed.
"""

import os
import select
import signal
import socket
import subprocess
import sys


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    try:
        proc = subprocess.Popen(argv[3:], executable=argv[2], stdin=subprocess.DEVNULL,
                                pass_fds=[int(fd) for fd in argv[1].split(",") if fd])
    except OSError as err:
        print(f"cannot start {argv[2]}: {err.strerror}", file=sys.stderr, flush=True)
        return 127
    signal.signal(signal.SIGTERM, lambda *_: sock.shutdown(socket.SHUT_RDWR))
    sock.sendall(f"{proc.pid}\n".encode())
    qemu = os.pidfd_open(proc.pid)
    while True:
        ready, _, _ = select.select([sock.fileno(), qemu], [], [])
        if qemu in ready:
            code = proc.wait()
            return 128 - code if code < 0 else code
        try:
            message = sock.recv(64)
        except OSError:
            message = b""
        if message.startswith(b"release"):
            return 0
        if not message:
            proc.kill()
            proc.wait()
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
