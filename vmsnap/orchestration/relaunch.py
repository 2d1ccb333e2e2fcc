"""Relaunch: which command line a restore may start, and starting it safely.

A snapshot file is input: the command line stored in it runs only if this host's key signed
the file (or the user says --trust-command-line after reading it in `vmsnap info`), only if
its program is a QEMU system emulator (never a shell or a script), and, unless trusted
explicitly, only without the options that make QEMU itself run a program.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Sequence

from ..errors import VmsnapError
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
