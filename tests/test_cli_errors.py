"""Every bad input the CLI can meet ends in exactly one line on stderr naming the problem,
a non-zero exit and no traceback. The inputs are real files: a paused BootGuest saved by
QEMU 7.2 through exec:cat, imported with `vmsnap import`, then damaged in known places."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.craft import flip_bit
from testbed.guests import BootGuest
from testbed.qemu import Vm
from testbed.streams import page_data_positions
from testbed.transfer import VMSNAP, save_with_cat
from vmsnap.fileformat.reader import open_snapshot
from vmsnap.fileformat.trailer import COMMIT_SIZE, xxh3
from vmsnap.stream import StreamDecoder, StreamError
from vmsnap.stream.decoder import find_vmdesc

pytestmark = pytest.mark.qemu


@dataclass(frozen=True)
class Captured:
    dir: Path
    stream: Path  # plain stream from exec:cat
    snap: Path  # vmsnap import of it
    stream_end: int
    tail_offset: int
    body_offset: int
    pc_ram_pages: int  # file offset of pc.ram's page area
    pc_ram_bitmap: int
    first_present: int  # page number of a present pc.ram page (mid-way in the bitmap)


@pytest.fixture(scope="session")
def captured(tmp_path_factory) -> Captured:
    d = tmp_path_factory.mktemp("cli-errors")
    d.chmod(0o700)
    guest = BootGuest(memory_mb=256, limit_mb=32)
    stream = d / "stream"
    with Vm(guest.config("7.2", d), d, "src") as vm:
        guest.boot(vm)
        save_with_cat(vm, stream, live=False)
    vm.kill()
    snap = d / "snap.vms"
    run("import", stream, snap, check=0)
    with open_snapshot(snap) as s:
        ram = s.block("pc.ram")
        present = ram.present.nonzero()[0]
        first = int(present[len(present) // 2])
        return Captured(d, stream, snap, s.stream_end, s.tail_offset,
                        s.trailer.commit.body_offset, ram.pages_offset, ram.bitmap_offset,
                        first)


def run(*args, stdin=None, check: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([VMSNAP, *map(str, args)], stdin=stdin, capture_output=True,
                          timeout=300)
    if check is not None:
        assert proc.returncode == check, proc.stderr.decode(errors="replace")
    return proc


def fails_with(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Assert a clean one-line failure mentioning every word; return the line."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"exit 0, stderr {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    return lines[0]


def copy(src: Path, dst: Path, size: int | None = None) -> Path:
    shutil.copyfile(src, dst)
    if size is not None:
        os.truncate(dst, size)
    return dst


# -- truncated files ------------------------------------------------------------------------

CUTS = {
    "header": lambda c: 40,
    "bitmap": lambda c: c.pc_ram_bitmap + 100,
    "page-area": lambda c: c.pc_ram_pages + c.first_present * 4096 + 123,
    "device-state": lambda c: c.tail_offset + 200,
    "trailer-body": lambda c: c.body_offset + 1000,
    "commit-record": lambda c: os.path.getsize(c.snap) - COMMIT_SIZE + 20,
}


@pytest.mark.parametrize("where", list(CUTS))
@pytest.mark.parametrize("verb", ["info", "verify", "send"])
def test_truncated_file(captured, tmp_path, where, verb):
    f = copy(captured.snap, tmp_path / "cut.vms", CUTS[where](captured))
    line = fails_with(run(verb, f))
    assert any(w in line for w in ("truncated", "incomplete", "beyond end of file")), line


def test_cut_at_stream_end_is_native_without_checksums(captured, tmp_path):
    """A vmsnap file whose trailer is gone but whose QEMU stream is complete is exactly what
    QEMU itself writes: a QEMU-native file, accepted without checksums."""
    f = copy(captured.snap, tmp_path / "native.vms", captured.stream_end)
    import json

    info = json.loads(run("info", "--json", f, check=0).stdout)
    assert info["format"] == "qemu-native mapped-ram"
    assert "no checksums" in info["integrity"]
    fails_with(run("verify", f), "no checksums")
    # still a complete stream: send replays it
    out = run("send", f, check=0).stdout
    assert out == run("send", captured.snap, check=0).stdout


def _without_vmdesc(captured: Captured, dst: Path) -> tuple[Path, bytes]:
    """The capture as a QEMU-native file of a machine with suppress-vmdesc=on: the stream
    up to its EOF byte, no vmdesc, no trailer. Returns the file and its device state."""
    stream = captured.stream.read_bytes()
    dec = StreamDecoder()
    dec.feed(stream)
    list(dec.events())
    assert dec.device_offset is not None
    j = find_vmdesc(stream)
    assert j is not None
    device = stream[dec.device_offset:j]
    with open_snapshot(captured.snap) as s:
        end = s.tail_offset + s.tail.rindex(device) + len(device)
    copy(captured.snap, dst, end)
    return dst, device


def test_native_without_vmdesc(captured, tmp_path):
    f, _ = _without_vmdesc(captured, tmp_path / "novmdesc.vms")
    run("info", f, check=0)


def test_cut_after_a_false_footer_without_vmdesc(captured, tmp_path):
    """Device bytes that happen to read `7e <section id> 00` (a register value) end a cut
    file exactly as a whole vmdesc-less stream ends: the device sections must chain up."""
    f, device = _without_vmdesc(captured, tmp_path / "cut.vms")
    start = os.path.getsize(f) - len(device)
    at = start + device.index(b"cpu\x00") + 40  # inside the cpu section's registers
    with open(f, "r+b") as fh:
        fh.seek(at - 6)
        fh.write(b"\x7e" + struct.pack(">I", 999) + b"\x00")
    os.truncate(f, at)
    for verb in ("info", "verify", "send"):
        line = fails_with(run(verb, f))
        assert "incomplete" in line, line


# -- damaged content ------------------------------------------------------------------------

def test_bit_flip_in_a_page(captured, tmp_path):
    page = captured.first_present
    f = copy(captured.snap, tmp_path / "flip.vms")
    flip_bit(f, captured.pc_ram_pages + page * 4096 + 2000, 0x10)
    where = ("pc.ram", f"{page * 4096:#x}")
    fails_with(run("verify", f), "corrupt", *where)
    proc = run("send", f)
    fails_with(proc, "corrupt", *where)
    # the stream stops before its end: a destination never gets to run the guest
    decoder = StreamDecoder()
    decoder.feed(proc.stdout)
    list(decoder.events())
    with pytest.raises(StreamError):
        list(decoder.close())
    fails_with(run("export", f, tmp_path / "out.stream"), "corrupt", *where)
    assert not (tmp_path / "out.stream").exists() or \
        os.path.getsize(tmp_path / "out.stream") < os.path.getsize(captured.stream)


def test_bit_flip_in_device_state(captured, tmp_path):
    f = copy(captured.snap, tmp_path / "flip.vms")
    flip_bit(f, captured.tail_offset + 300)
    fails_with(run("verify", f), "corrupt")
    fails_with(run("send", f), "corrupt")


def test_wrong_magic(captured, tmp_path):
    f = copy(captured.snap, tmp_path / "magic.vms")
    with open(f, "r+b") as fh:
        fh.write(b"XXXX")
    for verb in ("info", "verify", "send"):
        fails_with(run(verb, f), "magic")


def test_wrong_magic_in_plain_stream(captured, tmp_path):
    f = tmp_path / "stream"
    with open(captured.stream, "rb") as src, open(f, "wb") as dst:
        dst.write(b"XXXX" + src.read(1 << 20)[4:])
    fails_with(run("import", f, tmp_path / "x.vms"), "magic")
    assert not (tmp_path / "x.vms").exists()
    assert not (tmp_path / "x.vms.partial").exists()


FOREIGN = {
    "random": lambda: os.urandom(3 << 20),
    "elf": lambda: Path("/bin/true").read_bytes(),
    "empty": lambda: b"",
    "text": lambda: b"hello, world\n" * 1000,
}


@pytest.mark.parametrize("kind", list(FOREIGN))
@pytest.mark.parametrize("verb", ["info", "verify", "send", "import"])
def test_foreign_file(tmp_path, kind, verb):
    f = tmp_path / "foreign"
    f.write_bytes(FOREIGN[kind]())
    args = (verb, f, tmp_path / "out.vms") if verb == "import" else (verb, f)
    fails_with(run(*args))
    assert not (tmp_path / "out.vms").exists()
    assert not (tmp_path / "out.vms.partial").exists()


def test_foreign_stream_on_stdin(tmp_path):
    with open("/bin/true", "rb") as src:
        fails_with(run("receive", tmp_path / "x.vms", stdin=src))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("verb", ["info", "verify", "send"])
def test_missing_file(tmp_path, verb):
    fails_with(run(verb, tmp_path / "nope.vms"), "nope.vms")


def patch_commit_version(path: Path, version: int) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - COMMIT_SIZE)
        rec = bytearray(f.read(COMMIT_SIZE))
        rec[8:12] = struct.pack("<I", version)
        rec[56:] = struct.pack("<Q", xxh3(bytes(rec[:56])))
        f.seek(size - COMMIT_SIZE)
        f.write(rec)


def patch_body_version(path: Path, body_offset: int, version: int) -> None:
    """Change the body's version field and fix the body checksum in the commit record."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(body_offset + 8)
        f.write(struct.pack("<I", version))
        f.seek(body_offset)
        body = f.read(size - COMMIT_SIZE - body_offset)
        f.seek(size - COMMIT_SIZE)
        rec = bytearray(f.read(COMMIT_SIZE))
        rec[32:40] = struct.pack("<Q", xxh3(body))
        rec[56:] = struct.pack("<Q", xxh3(bytes(rec[:56])))
        f.seek(size - COMMIT_SIZE)
        f.write(rec)


@pytest.mark.parametrize("where", ["commit", "body"])
def test_unknown_format_version(captured, tmp_path, where):
    f = copy(captured.snap, tmp_path / "v9.vms")
    if where == "commit":
        patch_commit_version(f, 9)
    else:
        patch_body_version(f, captured.body_offset, 9)
    for verb in ("info", "verify", "send"):
        fails_with(run(verb, f), "version 9")


def test_corrupt_commit_record(captured, tmp_path):
    f = copy(captured.snap, tmp_path / "c.vms")
    flip_bit(f, os.path.getsize(f) - COMMIT_SIZE + 20)
    for verb in ("info", "verify", "send"):
        fails_with(run(verb, f), "trailer")


# -- receive from stdin ------------------------------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-existing"])
def test_stream_cut_mid_page_on_stdin(captured, tmp_path, previous):
    position = sorted(page_data_positions(captured.stream).values())[1000] + 1234
    cut = tmp_path / "cut.stream"
    with open(captured.stream, "rb") as src:
        cut.write_bytes(src.read(position))
    target = tmp_path / "snap.vms"
    if previous:
        copy(captured.snap, target)
        before = digest(target)
    with open(cut, "rb") as stdin:
        args = ("receive", "--force", target) if previous else ("receive", target)
        fails_with(run(*args, stdin=stdin), "stream")
    assert not Path(f"{target}.partial").exists()
    if previous:
        assert digest(target) == before
    else:
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cut.stream"] + (["snap.vms"] if previous else []))


@pytest.mark.parametrize("cut", ["empty", "header-only", "before-device-state"])
def test_stream_cut_elsewhere_on_stdin(captured, tmp_path, cut):
    size = {"empty": 0, "header-only": 20,
            "before-device-state": os.path.getsize(captured.stream) - 2000}[cut]
    with open(captured.stream, "rb") as src:
        (tmp_path / "s").write_bytes(src.read(size))
    with open(tmp_path / "s", "rb") as stdin:
        fails_with(run("receive", tmp_path / "x.vms", stdin=stdin))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_receive_refuses_to_overwrite(captured, tmp_path):
    target = copy(captured.snap, tmp_path / "snap.vms")
    before = digest(target)
    with open(captured.stream, "rb") as stdin:
        fails_with(run("receive", target, stdin=stdin), "exists", "--force")
    assert digest(target) == before
    with open(captured.stream, "rb") as stdin:
        fails_with(run("import", captured.stream, target), "exists", "--force")
    assert digest(target) == before
    with open(captured.stream, "rb") as stdin:
        run("receive", "--force", target, stdin=stdin, check=0)
    run("verify", target, check=0)
    assert not Path(f"{target}.partial").exists()


def test_export_refuses_to_overwrite(captured, tmp_path):
    target = tmp_path / "out.stream"
    target.write_bytes(b"keep me")
    fails_with(run("export", captured.snap, target), "exists", "--force")
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("args", [("info", "--json"), ("info",), ("send",)], ids=" ".join)
def test_reader_gone(captured, args):
    """stdout's reader has gone (`vmsnap info | head`, a destination QEMU that died during
    `send`): one line, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([VMSNAP, *args, str(captured.snap)], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(write_end)
    if args == ("info",):  # rich's console exits quietly (status 1) on a broken pipe
        assert proc.returncode != 0 and not proc.stderr
    else:
        fails_with(proc, "broken pipe")


def test_info_json_is_one_event_line_and_no_direct_is_honoured(captured):
    """`info --json` prints the same JSON-lines "done" event as every verb; -v logs how the
    file was opened, --no-direct makes that buffered."""
    import json

    proc = run("-v", "info", "--json", "--no-direct", captured.snap, check=0)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert (event["event"], event["op"], event["format"]) == ("done", "info", "vmsnap")
    assert "buffered (O_DIRECT not requested) I/O" in proc.stderr.decode()
