"""vmsnap command line: a thin layer over the Python API, in the style of virsh/qemu-img.

Every failure a user can cause ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__, api
from .errors import USER_ERRORS, VmsnapError, interrupted, one_line
from .orchestration.options import SEAL_WHEN
from .progress import Reporter


def _refuse_overwrite(path: str, force: bool) -> None:
    from .targets import refuse_overwrite

    refuse_overwrite(path, force)


def _gib_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


#: A verb: parsed arguments and the event reporter in, exit status out.
Command = Callable[[argparse.Namespace, Reporter], int]


def cmd_receive(args: argparse.Namespace, rep: Reporter) -> int:
    _refuse_overwrite(args.file, args.force)
    rep.start("receive")
    t0 = time.monotonic()
    with open(args.stream, "rb") if args.stream else _stdin() as src:
        stats = api.receive(src, args.file, qemu_version=args.qemu_version,
                            direct=args.direct, progress=rep.update)
    dt = time.monotonic() - t0
    rep.done(file=stats.path, stream_bytes=stats.stream_bytes, pages=stats.pages,
             zero_pages=stats.zero_pages, seconds=round(dt, 3),
             gb_per_s=_gib_s(stats.stream_bytes, dt), direct_io=stats.direct)
    return 0


def cmd_send(args: argparse.Namespace, rep: Reporter) -> int:
    if args.stream:
        _refuse_overwrite(args.stream, args.force)
    rep.start("send")
    t0 = time.monotonic()
    with open(args.stream, "wb") if args.stream else _stdout() as sink:
        stats = api.send(args.file, sink, direct=args.direct, progress=rep.update)
    dt = time.monotonic() - t0
    rep.done(stream_bytes=stats.stream_bytes, pages=stats.pages, seconds=round(dt, 3),
             gb_per_s=_gib_s(stats.stream_bytes, dt))
    return 0


def _stdin() -> io.BufferedReader:
    if sys.stdin is None:
        raise VmsnapError("no standard input to read the stream from")
    return open(sys.stdin.fileno(), "rb", closefd=False)  # noqa: SIM115


def _stdout() -> io.BufferedWriter:
    return open(sys.stdout.fileno(), "wb", closefd=False)  # noqa: SIM115


def cmd_info(args: argparse.Namespace, rep: Reporter) -> int:
    info = api.info(args.file, direct=args.direct)
    if args.json:  # one JSON line, the same "done" event as every other verb's last line
        rep.result("info", **info)
        return 0
    from .infotable import print_info  # rich loads only to draw these tables

    print_info(info)
    return 0


def cmd_verify(args: argparse.Namespace, rep: Reporter) -> int:
    t0 = time.monotonic()
    with api.open(args.file, direct=args.direct) as snap:
        rep.start("verify", sum(b.present_count * b.page_size for b in snap.blocks))
        result = snap.verify(progress=rep.update)
    dt = time.monotonic() - t0
    rep.done(file=args.file, pages=result.pages, bytes=result.bytes, seconds=round(dt, 3),
             ok=True)
    if not args.json:
        print(f"{args.file}: OK, {result.pages} pages and {result.ranges} stream ranges verified")
    return 0


def cmd_seal(args: argparse.Namespace, rep: Reporter) -> int:
    rep.start("seal")
    t0 = time.monotonic()
    pages = api.seal(args.file, direct=args.direct)
    rep.done(file=args.file, pages=pages, seconds=round(time.monotonic() - t0, 3))
    if not args.json:
        print(f"{args.file}: sealed, {pages} pages checksummed")
    return 0


def cmd_import(args: argparse.Namespace, rep: Reporter) -> int:
    _refuse_overwrite(args.dest, args.force)
    rep.start("import")
    t0 = time.monotonic()
    stats, domain = api.import_stream(args.source, args.dest, progress=rep.update)
    dt = time.monotonic() - t0
    rep.done(file=stats.path, stream_bytes=stats.stream_bytes, pages=stats.pages,
             zero_pages=stats.zero_pages, seconds=round(dt, 3),
             gb_per_s=_gib_s(stats.stream_bytes, dt), libvirt_image=domain is not None)
    return 0


def cmd_export(args: argparse.Namespace, rep: Reporter) -> int:
    if not args.libvirt:
        if args.xml:
            raise VmsnapError("--xml goes with --libvirt")
        args.file, args.stream = args.source, args.dest
        return cmd_send(args, rep)
    if not _is_fifo(args.dest):
        _refuse_overwrite(args.dest, args.force)
    xml = _read_xml(args.xml)
    rep.start("export")
    t0 = time.monotonic()
    stats = api.export_image(args.source, args.dest, xml=xml, progress=rep.update)
    dt = time.monotonic() - t0
    rep.done(image=args.dest, stream_bytes=stats.stream_bytes, pages=stats.pages,
             seconds=round(dt, 3), gb_per_s=_gib_s(stats.stream_bytes, dt))
    return 0


def _read_xml(path: str | None) -> str | None:
    """The domain XML in the file `path` (--xml), if given."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VmsnapError(f"{path} is not a domain XML (not UTF-8 text)") from None


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def cmd_save(args: argparse.Namespace, rep: Reporter) -> int:
    from .orchestration.modes import After

    after = After.RESUME if args.resume else After.QUIT if args.quit else None
    if args.domain:  # one stream by default: multifd needs a path in QEMU's reach
        r = api.save_domain(args.domain, args.file, uri=args.connect, live=args.live,
                            background=args.background, after=after, force=args.force,
                            reporter=rep, direct=args.direct,
                            channels=0 if args.channels is None else args.channels,
                            downtime_limit_ms=args.downtime_limit,
                            bandwidth_mib_s=args.bandwidth, seal=args.seal)
    else:
        if args.connect:
            raise VmsnapError("--connect goes with --domain")
        r = api.save(args.qmp, args.file, live=args.live, background=args.background,
                     after=after, force=args.force, reporter=rep, direct=args.direct,
                     channels=args.channels, downtime_limit_ms=args.downtime_limit,
                     bandwidth_mib_s=args.bandwidth, seal=args.seal)
    if not args.json:
        pause = f", guest paused {r.downtime_ms} ms" if r.mode != "paused" else ""
        rounds = (f" in {r.rounds} round{'s' * (r.rounds != 1)} (guest dirtying "
                  f"{r.dirty_mb_s or 0} MB/s, throttled {r.throttle_pct}%, downtime limit "
                  f"{r.downtime_limit_ms} ms)" if r.mode == "live" else "")
        print(f"saved {r.path} ({r.mode}): {r.stream_bytes:,} stream bytes in {r.seconds:.2f}s "
              f"({_gib_s(r.stream_bytes, r.seconds)} GB/s){rounds}{pause}, VM {r.final_state}")
        if not r.pages_checked:
            print(f"committed after {r.committed_seconds:.2f}s; page checksums "
                  + (f"being added (vmsnap seal, pid {r.sealing_pid})" if r.sealing_pid
                     else "pending: run `vmsnap seal` on it"))
    return 0


def cmd_restore(args: argparse.Namespace, rep: Reporter) -> int:
    command = args.qemu_command
    if command and args.qmp:
        raise VmsnapError("give either --qmp or a QEMU command line, not both")
    if args.lazy and args.channels is not None:
        raise VmsnapError("--lazy sends pages itself: it takes no --channels")
    if args.verify and not args.lazy:
        raise VmsnapError("--verify goes with --lazy (a restore checks every page anyway)")
    if args.resume and not (args.lazy and args.qmp):
        raise VmsnapError("--resume finishes a lazy restore whose vmsnap died: give it with "
                          "--lazy and --qmp SOCKET")
    if args.verify is False and args.lazy:
        raise VmsnapError("--no-verify is for eager restores (--lazy checks every page it "
                          "sends)")
    if args.domain or args.xml or args.connect:
        if command or args.qmp:
            raise VmsnapError("--domain/--xml/--connect restore through libvirt: "
                              "not with --qmp or a QEMU command line")
        if args.domain and args.xml:
            raise VmsnapError("give either --domain or --xml, not both")
        r = api.restore_domain(args.file, uri=args.connect, domain=args.domain,
                               xml=_read_xml(args.xml),
                               paused=args.paused, trust_xml=args.trust_command_line,
                               reporter=rep, direct=args.direct, lazy=args.lazy,
                               channels=args.channels)
    else:
        r = api.restore(args.file, qmp_address=args.qmp, command=command or None,
                        paused=args.paused, reporter=rep, direct=args.direct,
                        channels=args.channels, trust_command_line=args.trust_command_line,
                        lazy=args.lazy, verify=args.verify, resume=args.resume,
                        populate=args.populate)
    if not args.json:
        running = getattr(r, "running_seconds", None)
        print(f"restored {r.path}: {r.pages:,} pages in {r.seconds:.2f}s, VM {r.final_state}"
              + (f" (running after {running:.2f}s)" if running is not None else "")
              + (f" (pid {r.pid}, QMP {r.qmp})" if r.pid else ""))
    return 0


def _channels_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channels", type=int, metavar="N",
                        help="parallel multifd channels (0: one plain stream; default: one "
                             "per CPU, 2 to 8; saves from QEMU < 8.1, whose multifd sender "
                             "busy-waits: one stream)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmsnap", description="Save and restore QEMU VMs to fixed-offset snapshot files.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="debug log on stderr (QMP commands, channels, I/O); -vv adds qemu.qmp's")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true",
                        help="machine-readable output: one JSON event per line")
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="debug log on stderr")
        sp.add_argument("--no-direct", dest="direct", action="store_false",
                        help="buffered I/O instead of O_DIRECT for the snapshot file")
        return sp

    sp = add("receive", cmd_receive, "read a migration stream on stdin into a snapshot FILE "
             '(for migrate "exec:vmsnap receive FILE")')
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    sp.add_argument("--qemu-version", help="record the source QEMU's version in FILE")
    sp.set_defaults(stream=None)
    sp = add("send", cmd_send, "write FILE as a migration stream on stdout "
             '(for -incoming "exec:vmsnap send FILE")')
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(stream=None, force=False)
    sp = add("import", cmd_import, "convert a plain stream file (from exec:cat) or a libvirt "
             "save image (virsh save / managedsave, a file or a FIFO) to a snapshot")
    sp.add_argument("source", metavar="STREAM_OR_IMAGE")
    sp.add_argument("dest", metavar="FILE")
    sp.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    sp = add("export", cmd_export, "convert a snapshot to a plain stream file, or with --libvirt "
             "to a libvirt save image (a file or a FIFO, for virsh restore)")
    sp.add_argument("source", metavar="FILE")
    sp.add_argument("dest", metavar="STREAM_OR_IMAGE")
    sp.add_argument("--libvirt", action="store_true", help="write a libvirt save image")
    sp.add_argument("--xml", metavar="XML",
                    help="the domain XML for the image (default: the one saved in FILE)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing output")
    sp = add("seal", cmd_seal, "add vmsnap's checksums and metadata to a mapped-ram file "
             "QEMU wrote itself (migrate file: with mapped-ram), in place")
    sp.add_argument("file", metavar="FILE")
    sp = add("info", cmd_info, "show what a snapshot file holds")
    sp.add_argument("file", metavar="FILE")
    sp = add("verify", cmd_verify, "check every page of a snapshot against its checksums")
    sp.add_argument("file", metavar="FILE")
    sp = add("save", cmd_save, "save a running VM (over QMP, or a libvirt domain) to FILE")
    vm = sp.add_mutually_exclusive_group(required=True)
    vm.add_argument("--qmp", metavar="SOCKET", help="the VM's QMP socket")
    vm.add_argument("--domain", metavar="NAME", help="a libvirt domain")
    sp.add_argument("--connect", metavar="URI",
                    help="libvirt connection URI for --domain (default qemu:///system)")
    sp.add_argument("file", metavar="FILE")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--live", action="store_true",
                     help="copy RAM while the guest runs; QEMU stops it for the last round "
                          "(the file holds RAM as it was at the end)")
    how.add_argument("--background", action="store_true",
                     help="a point-in-time checkpoint: the file holds RAM as it was when the "
                          "save began, the guest runs on (paused ~ms for device state); "
                          "QEMU >= 6.0 and a kernel with userfaultfd write-protect for the "
                          "guest's memory; always one stream (no --channels)")
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--resume", action="store_true",
                      help="resume the VM afterwards (a --background save does by itself)")
    what.add_argument("--quit", action="store_true", help="end QEMU afterwards")
    sp.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    sp.add_argument("--seal", choices=SEAL_WHEN, default="now",
                    help="where QEMU >= 9.1 writes the pages itself (paused, --channels >= 1): "
                    "the file is committed first, its page checksums (a read-back) come now "
                    "(default), in the background (a detached `vmsnap seal`) or later (run "
                    "`vmsnap seal FILE`); until then it restores with pages unchecked and "
                    "`info` and `verify` say so")
    sp.add_argument("--downtime-limit", type=int, metavar="MS",
                    help="--live: longest final stop of the guest (default: chosen from the "
                         "guest's dirty rate and the save's bandwidth)")
    sp.add_argument("--bandwidth", type=int, metavar="MiB/s",
                    help="--live: cap the save's throughput while the guest runs (it shares "
                         "the disk meanwhile); the final stop goes at full speed")
    _channels_option(sp)
    sp = add("restore", cmd_restore, "restore FILE into a new or waiting QEMU")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--qmp", metavar="SOCKET",
                    help="restore into this QEMU (started with -incoming defer)")
    sp.add_argument("--paused", action="store_true", help="leave the VM paused")
    sp.add_argument("--connect", metavar="URI", help="libvirt connection URI for a domain file "
                    "(default qemu:///system)")
    sp.add_argument("--domain", metavar="NAME",
                    help="restore through libvirt under defined domain NAME's XML")
    sp.add_argument("--xml", metavar="FILE", help="restore through libvirt under this XML")
    sp.add_argument("--trust-command-line", action="store_true",
                    help="run the stored command line although this host did not sign the "
                         "file, or although it makes QEMU run a program (read it with "
                         "`vmsnap info` first); it must still start a qemu-system-* binary. "
                         "For a domain file: define the domain from its stored XML although "
                         "this host did not sign it")
    sp.add_argument("--lazy", choices=("auto", "postcopy", "mmap"), metavar="ENGINE",
                    help="--lazy[=ENGINE]: run the guest at once, RAM following on demand "
                    "(ENGINE: postcopy or mmap; default auto: postcopy)")
    check = sp.add_mutually_exclusive_group()
    check.add_argument("--verify", action="store_true", default=None,
                       help="with --lazy=mmap: check every page before the guest starts")
    check.add_argument("--no-verify", dest="verify", action="store_false",
                       help="let a QEMU >= 9.1 target read the file itself (mapped-ram, "
                       "multifd, direct-io): fastest, pages unchecked, device state checked; "
                       "elsewhere pages are checked as they are sent")
    sp.add_argument("--populate", action="store_true",
                    help="with --lazy=mmap: QEMU copies every page privately while the guest "
                    "runs (its first pass over RAM as fast as anonymous memory's; no page "
                    "cache shared with other VMs; QEMU's main loop waits meanwhile)")
    sp.add_argument("--resume", action="store_true",
                    help="with --lazy --qmp: finish a lazy restore of FILE whose vmsnap died, "
                    "on the target it left in postcopy-paused (QEMU's postcopy recovery)")
    _channels_option(sp)
    sp.set_defaults(qemu_command=[])
    sp.usage = sp.format_usage().removeprefix("usage: ").rstrip() + " [-- QEMU_COMMAND ...]"
    sp.epilog = "After --, a QEMU command line to launch instead of the stored one."
    return p


def _setup_logging(verbose: int) -> None:
    """Warnings always reach stderr; -v adds vmsnap's debug records, -vv qemu.qmp's too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else "vmsnap: %(message)s"))
    logger = logging.getLogger("vmsnap")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose >= 2:
        logging.getLogger("qemu.qmp").addHandler(handler)
        logging.getLogger("qemu.qmp").setLevel(logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    tail: list[str] = []
    if "--" in argv:  # restore ... -- QEMU_COMMAND: everything after -- is QEMU's
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    # `--lazy` alone means --lazy=auto (an optional value would swallow FILE)
    argv = ["--lazy=auto" if a == "--lazy" else a for a in argv]
    args = build_parser().parse_args(argv)
    if tail:
        if args.command != "restore":
            build_parser().error("only restore takes a command line after --")
        args.qemu_command = tail
    _setup_logging(args.verbose)
    if args.command != "restore":  # a restore collects from its first await (api._run)
        api.resume_gc()
    # send writes the stream on stdout: its JSON events go to stderr
    out = sys.stderr if args.command == "send" or (args.command == "export" and not args.dest) \
        else sys.stdout
    rep = Reporter(as_json=args.json, out=out)
    try:
        func: Command = args.func
        return func(args, rep)
    except USER_ERRORS as err:
        if isinstance(err, BrokenPipeError):  # our reader went away: no more output there
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        message = one_line(err)
        rep.error(message)
        print(f"vmsnap {args.command}: error: {message}", file=sys.stderr)
        return 1
    except BaseException as err:
        if not interrupted(err):
            raise
        message = one_line(err)
        rep.error(message)
        print(f"vmsnap {args.command}: {message}", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
