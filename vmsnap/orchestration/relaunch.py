"""Relaunch: which command line a restore may start, and starting it safely.

A snapshot file is input: the command line stored in it runs only if this host's key signed
the file (or the user says --trust-command-line after reading it in `vmsnap info`), only if
its program is a QEMU system emulator (never a shell or a script), and, unless trusted
explicitly, only without the options that make QEMU itself run a program.

This module loads nothing but the standard library, so that a restore can start QEMU
(start_qemu) before the rest of vmsnap, numpy and QEMU's QMP library have loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from ..errors import VmsnapError

if TYPE_CHECKING:  # the standard library only at run time: see start_qemu
    from ..hostkey import Trust

#: Options of the saved command line that clash with an incoming restore (name → has value).
DROPPED_OPTIONS = {"incoming": True, "loadvm": True, "daemonize": False, "S": False}
#: Options whose whole purpose is loading code or more options from elsewhere.
CODE_OPTIONS = ("plugin", "readconfig")
#: `key=value` (or JSON "key": value) settings that make QEMU run a program (tap's
#: script/downscript, bridge's setuid helper), in any option or -set; "no" turns them off.
_PROGRAM_SETTING = re.compile(
    r"""(?:^|[,{\s"'.])"?(script|downscript|helper)"?\s*[=:]\s*"?([^,"}\s]*)""")
_EMULATOR = re.compile(r"qemu-system-[A-Za-z0-9_]+")


def option_name(arg: str) -> str | None:
    """`-name` or `--name` → "name"; anything else (values) → None."""
    return arg.lstrip("-") if arg.startswith("-") and len(arg) > 1 else None


def relaunch_argv(argv: Sequence[str], qmp_path: str) -> list[str]:
    """The saved QEMU command line, made to wait for an incoming stream on our QMP socket."""
    if not argv:
        raise VmsnapError("empty QEMU command line")
    out = [argv[0]]
    i = 1
    while i < len(argv):
        name = option_name(argv[i])
        if name in DROPPED_OPTIONS:
            i += 2 if DROPPED_OPTIONS[name] else 1
            continue
        out.append(argv[i])
        i += 1
    return [*out, "-S", "-incoming", "defer", "-qmp", f"unix:{qmp_path},server=on,wait=off"]


def check_strings(argv: Sequence[str]) -> None:
    """Every argument must be passable to exec: no NUL byte, encodable as a file name."""
    for i, arg in enumerate(argv):
        try:
            if "\0" in arg:
                raise ValueError("NUL byte")
            os.fsencode(arg)  # UnicodeEncodeError (a ValueError) for a lone surrogate
        except ValueError:
            raise VmsnapError(f"stored command line argument {i} ({ascii(arg)[:60]}) "
                              "cannot be passed to a program (NUL byte or invalid text)") from None


def program_options(argv: Sequence[str]) -> list[str]:
    """The arguments of `argv` that make QEMU run or load a program."""
    found = []
    for arg in argv[1:]:
        if option_name(arg) in CODE_OPTIONS:
            found.append(arg)
        found += [m.group(0).strip(" ,{\"'.") for m in _PROGRAM_SETTING.finditer(arg)
                  if m.group(2) not in ("", "no")]
    return found


def _safe_owner(st: os.stat_result) -> bool:
    """Owned by root or by us, and writable by no one else."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def qemu_emulator(program: str) -> str:
    """The real path of `program` if it is a QEMU system emulator: resolved through PATH and
    symlinks, named qemu-system-*, an ELF executable (never a script or a shell) that only
    root or the caller can have replaced. Raises VmsnapError otherwise."""
    found = shutil.which(program) if "/" not in program else program
    if found is None:
        raise VmsnapError(f"stored command line runs {program!r}, which is not on PATH")
    real = os.path.realpath(found)
    what = f"stored command line runs {program!r} ({real})"
    if not _EMULATOR.fullmatch(os.path.basename(real)):
        raise VmsnapError(f"{what}, which is not a QEMU system emulator (qemu-system-*)")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st, magic = os.fstat(fd), os.read(fd, 4)
        finally:
            os.close(fd)
        parent = os.stat(os.path.dirname(real))
    except OSError as err:
        raise VmsnapError(f"{what}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or magic != b"\x7fELF" or not st.st_mode & 0o111:
        raise VmsnapError(f"{what}, which is not an executable program (ELF)")
    if not (_safe_owner(st) and _safe_owner(parent)):
        raise VmsnapError(f"{what}, which users other than root or you could have replaced")
    return real


def approve(argv: Sequence[str], trust: Trust, trust_command_line: bool, path: str) -> str:
    """Decide whether the command line stored in the file at `path` may run; return the
    emulator's real path to execute. Raises VmsnapError naming the reason otherwise."""
    if not trust.trusted and not trust_command_line:
        raise VmsnapError(
            f"will not run the command line stored in {path}: {trust.reason}; read it with "
            "`vmsnap info`, then restore with --trust-command-line, or give --qmp SOCKET or "
            "-- QEMU_COMMAND")
    check_strings(argv)
    program = qemu_emulator(argv[0])
    risky = program_options(argv)
    if risky and not trust_command_line:
        raise VmsnapError(f"the stored command line makes QEMU run a program ({risky[0]}); "
                          "read it with `vmsnap info`, then add --trust-command-line")
    return program


# -- never beside the original, one relaunch at a time ---------------------------------------

#: Options whose value is a disk image path.
_IMAGE_OPTIONS = ("hda", "hdb", "hdc", "hdd", "cdrom", "pflash", "mtdblock", "sd")
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64/aarch64
#: QEMU's image locks sit on bytes 100.. (permissions) and 200.. (shared permissions).
_QEMU_LOCK_BYTES = (100, 200)


def _settings(arg: str) -> dict[str, str]:
    """`a=1,b=2` → {"a": "1", "b": "2"} (QEMU's ",," escape makes no difference here)."""
    return dict(p.split("=", 1) for p in arg.split(",") if "=" in p)


def server_sockets(argv: Sequence[str]) -> list[str]:
    """The unix socket paths `argv` names (QMP, monitors, chardevs)."""
    paths = []
    for arg in argv[1:]:
        if arg.startswith("unix:"):
            paths.append(arg[5:].split(",")[0])
        elif arg.startswith("socket,") and "path" in _settings(arg):
            paths.append(_settings(arg)["path"])
    return paths


def own_qmp(argv: Sequence[str]) -> str | None:
    """The first unix QMP socket `argv` opens itself, if any."""
    for prev, arg in zip(argv, argv[1:], strict=False):
        if option_name(prev) in ("qmp", "qmp-pretty") and arg.startswith("unix:"):
            return arg[5:].split(",")[0]
    return None


def disk_images(argv: Sequence[str]) -> list[str]:
    """The image file paths `argv` names (-drive file=, -blockdev filename=, -hda ...)."""
    paths = []
    for prev, arg in zip(argv, argv[1:], strict=False):
        if option_name(prev) in _IMAGE_OPTIONS:
            paths.append(arg)
        settings = _settings(arg)
        paths += [settings[k] for k in ("file", "filename") if k in settings]
    return paths


def _answers(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
        except OSError:
            return False  # a leftover of a QEMU that is gone (QEMU replaces it)
    return True


def _locked(path: str) -> bool:
    """True if another process holds QEMU's lock bytes of the image at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # QEMU will say what is wrong with it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        for start in _QEMU_LOCK_BYTES:
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 64, 0)
            if _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0] != fcntl.F_UNLCK:
                return True
        return False
    finally:
        os.close(fd)


def check_not_running(argv: Sequence[str], path: str) -> None:
    """Refuse to start `argv` while a QEMU already serves its sockets or holds its disks
    (the VM the file at `path` came from, or an earlier relaunch of it)."""
    for sock in server_sockets(argv):
        if _answers(sock):
            raise VmsnapError(f"will not relaunch {path}: its VM still runs ({sock} answers); "
                              "stop it first, or restore into another QEMU with --qmp")
    for image in disk_images(argv):
        if _locked(image):
            raise VmsnapError(f"will not relaunch {path}: its disk {image} is in use by a "
                              "running QEMU")


def _object_options(value: str) -> dict[str, str]:
    """The properties of an `-object` value, in QEMU's key=value form (",," escapes a
    comma) or its JSON form; the bare first word is the type."""
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return {}
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in obj.items()
                } if isinstance(obj, dict) else {}
    out = {}
    for i, item in enumerate(value.replace(",,", "\0").split(",")):
        key, sep, val = item.replace("\0", ",").partition("=")
        if not sep and i == 0:
            key, val = "qom-type", key
        out[key] = val
    return out


def fresh_backing_files(argv: list[str]) -> None:
    """Before relaunching QEMU from `argv`: give every shared `memory-backend-file` whose
    mem-path is an existing file a new, empty file at that path (a new inode, same owner
    and mode), so the new QEMU never shares RAM with one still running on the old file.
    Only for a QEMU run directly: a wrapper may give it another view of the paths."""
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return
    for opt, value in zip(argv, argv[1:], strict=False):
        if opt.lstrip("-") != "object":
            continue
        props = _object_options(value)
        if (props.get("qom-type") != "memory-backend-file"
                or props.get("share") not in ("on", "true", "yes")):
            continue
        path = props.get("mem-path", "")
        try:
            st = os.stat(path)
        except OSError:
            continue  # QEMU creates it (or reports the problem itself)
        if not stat.S_ISREG(st.st_mode):
            continue  # a directory: QEMU makes its own unlinked file there
        tmp = f"{path}.vmsnap-{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)


class RelaunchLock:
    """An exclusive flock on the snapshot file for one relaunch: a second relaunch of the
    same file started meanwhile fails at once instead of starting a twin VM."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise VmsnapError(f"another vmsnap restore is relaunching {path}") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the guarded QEMU ---------------------------------------------------------------------------

GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")


class GuardedQemu:
    """QEMU started through guard.py: it dies with vmsnap, even on SIGKILL, until released.
    Starting it does not wait for the guard (a Python of its own) to start QEMU: its `pid`
    does."""

    def __init__(self, argv: Sequence[str], program: str | None, log_path: str,
                 pass_fds: Sequence[int] = ()) -> None:
        """`pass_fds`: descriptors QEMU inherits (the file a mapped restore maps)."""
        self.log_path = log_path
        ours, theirs = socket.socketpair()
        try:
            with open(log_path, "wb") as log:
                self._guard = subprocess.Popen(
                    [sys.executable, "-I", "-S", GUARD, str(theirs.fileno()),
                     ",".join(map(str, pass_fds)), program or argv[0], *argv],
                    pass_fds=[theirs.fileno(), *pass_fds], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours

    @cached_property
    def pid(self) -> int | None:
        """QEMU's pid, as the guard reports it once it started QEMU (None if it could not,
        or QEMU was killed before)."""
        line = b""
        while not line.endswith(b"\n"):
            try:
                chunk = self._sock.recv(32)
            except OSError:  # closed by kill()
                break
            if not chunk:
                break
            line += chunk
        return int(line) if line.endswith(b"\n") else None

    def poll(self) -> int | None:
        """The exit status of QEMU (through the guard), or None while it runs."""
        return self._guard.poll()

    def killed_by(self, timeout: float = 1.0) -> str | None:
        """The signal that ended QEMU ("SIGKILL"), once its guard says so (guard.py: exit
        status 128 + N); its guard ends within milliseconds of it, so this waits `timeout`
        at most. None if QEMU exited by itself, or still runs."""
        try:
            code = self._guard.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return signal.Signals(code - 128).name if code > 128 else None

    def kill(self) -> None:
        """End QEMU now (the guard sees its socket close) and wait for it."""
        self._sock.close()
        self._guard.wait()

    def release(self) -> None:
        """The restore is done: QEMU runs on without vmsnap."""
        self.pid  # noqa: B018 - read before the socket closes
        try:
            self._sock.sendall(b"release")
        except OSError:
            pass  # QEMU and its guard are already gone: poll() says so
        self._guard.wait()
        self._sock.close()


@dataclass
class Started:
    """A QEMU vmsnap started to restore into, waiting for an incoming stream: its QMP
    socket and log are in `workdir` (0700, vmsnap's); `at`: time.monotonic() at its start;
    `lock`: held while it relaunches the command line stored in the file."""

    proc: GuardedQemu
    workdir: str
    at: float = field(default_factory=time.monotonic)
    lock: RelaunchLock | None = None

    @property
    def qmp(self) -> str:
        return os.path.join(self.workdir, "qmp.sock")

    def discard(self) -> None:
        """End the QEMU and remove its directory (the restore failed before using it)."""
        self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()


def start_qemu(argv: list[str], path: str, program: str | None = None,
               workdir: str | None = None, launch_argv: list[str] | None = None,
               pass_fds: Sequence[int] = ()) -> Started:
    """Start `argv` for a restore of the snapshot at `path` (running `program`, an approved
    emulator, if given, else argv[0] through PATH), waiting for an incoming stream on a QMP
    socket in `workdir` (default: a new one), never beside a running original. Returns at
    once: QEMU starts meanwhile (the caller waits for its QMP socket). `launch_argv`: what to
    actually start, if `argv` is rewritten; `pass_fds`: descriptors it inherits."""
    check_not_running(argv, path)
    fresh_backing_files(argv)
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="vmsnap-")  # 0700
    qmp, log = os.path.join(workdir, "qmp.sock"), os.path.join(workdir, "qemu.log")
    try:
        return Started(GuardedQemu(relaunch_argv(launch_argv or argv, qmp), program, log,
                                   pass_fds), workdir)
    except BaseException:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
