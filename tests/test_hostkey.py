"""The host key and the relaunch policy, without QEMU: key file creation and checks, trailer
signatures (valid, foreign, altered-and-resealed), which programs and options may run."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from vmsnap.errors import VmsnapError
from vmsnap.fileformat.errors import CorruptTrailer
from vmsnap.fileformat.trailer import (
    COMMIT_SIZE,
    BlockChecksums,
    RangeChecksum,
    Trailer,
    TrailerMetadata,
    decode_trailer_bytes,
    encode_trailer,
    key_id,
    read_body,
    read_commit,
)
from vmsnap.hostkey import KEY_DIR_ENV, Trust, load_key, load_or_create_key, trust_of
from vmsnap.orchestration.relaunch import approve, program_options, qemu_emulator

QEMU = shutil.which("qemu-system-x86_64")
TRUSTED = Trust(True, "signed by this host's key")


@pytest.fixture
def keydir(tmp_path, monkeypatch):
    d = tmp_path / "keys"
    monkeypatch.setenv(KEY_DIR_ENV, str(d))
    return d


def image(key: bytes | None, command=("qemu-system-x86_64", "-m", "128")) -> bytes:
    md = TrailerMetadata(machine_type="pc-q35-7.2", command_line=list(command))
    blocks = [BlockChecksums("pc.ram", np.arange(10, dtype=np.uint64))]
    off, tr = encode_trailer(5000, md, blocks, [RangeChecksum(0, 100, 1)], key)
    return b"s" * 5000 + b"\0" * (off - 5000) + tr


def test_key_created_once_private(keydir):
    assert load_key() is None
    key = load_or_create_key()
    assert len(key) == 32 and load_or_create_key() == key
    assert (keydir / "host.key").stat().st_mode & 0o777 == 0o600
    assert keydir.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in keydir.iterdir()) == ["host.key"]


def test_key_readable_by_others_refused(keydir):
    load_or_create_key()
    (keydir / "host.key").chmod(0o644)
    with pytest.raises(VmsnapError, match="mode 0600"):
        load_key()


def test_key_symlink_refused(keydir, tmp_path):
    keydir.mkdir(mode=0o700)
    (tmp_path / "elsewhere").write_bytes(os.urandom(32))
    (keydir / "host.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(VmsnapError, match="host key"):
        load_key()


def test_signed_file_is_trusted(keydir):
    key = load_or_create_key()
    assert trust_of(decode_trailer_bytes(image(key))).trusted


def test_unsigned_and_foreign_files_are_not(keydir):
    load_or_create_key()
    assert "not signed" in trust_of(decode_trailer_bytes(image(None))).reason
    foreign = trust_of(decode_trailer_bytes(image(os.urandom(32))))
    assert not foreign.trusted and "another host" in foreign.reason


def test_resealed_command_line_is_not_trusted(keydir):
    """An attacker edits the command line and re-seals body checksum and commit record:
    the file decodes fine, but the signature no longer matches."""
    from testbed.craft import reseal

    path = keydir.parent / "f"
    path.write_bytes(image(load_or_create_key()))
    reseal(path, lambda md: md.update(command_line=["/bin/sh", "-c", "id"]))
    trailer = decode_trailer_bytes(path.read_bytes())
    assert trailer.metadata.command_line[0] == "/bin/sh"
    trust = trust_of(trailer)
    assert not trust.trusted and "altered" in trust.reason


def test_resealed_checksum_table_is_refused(keydir):
    """The signature covers the page checksum tables too (so the page contents), through
    their SHA-256: the metadata's signature checks without them (all a stored command line
    needs), and the altered tables are refused wherever they are used."""
    data = bytearray(image(load_or_create_key()))
    from testbed.craft import trailer_parts, write_trailer

    path = keydir.parent / "f"
    path.write_bytes(data)
    body_offset, stream_end, md, tables = trailer_parts(path)
    write_trailer(path, body_offset, stream_end,
                  json.dumps(md, separators=(",", ":"), sort_keys=True).encode(),
                  b"\1" + tables[1:])
    trailer = decode_trailer_bytes(path.read_bytes())  # body checksum fine: resealed
    assert trust_of(trailer, tables=False).trusted
    for use in (trust_of, lambda t: t.blocks, lambda t: t.check()):
        with pytest.raises(CorruptTrailer, match="altered after the file was signed"):
            use(trailer)


def _asked(data: bytes) -> tuple[Trailer, list[tuple[int, int]]]:
    """The trailer of the file image `data`, its tables read when asked for; the reads."""
    reads = []

    def pread(off: int, n: int) -> bytes:
        reads.append((off, n))
        return data[off:off + n]

    trailer = read_body(pread, read_commit(pread, len(data)), tables="asked")
    return trailer, reads


def test_signature_checks_without_the_tables(keydir):
    """A signed file's metadata signature verifies without reading the checksum tables
    (8 bytes a page: a relaunch would otherwise read and hash them first)."""
    data = image(load_or_create_key())
    trailer, reads = _asked(data)
    tables_at = len(data) - COMMIT_SIZE - 8 * 10
    assert trust_of(trailer, tables=False).trusted
    assert not any(off < tables_at + 80 and off + n > tables_at for off, n in reads), reads
    assert trust_of(trailer).trusted  # now read, and checked against the signed digest
    assert any(off == tables_at for off, _ in reads)


def _sign_v1(path: Path, key: bytes, md: dict) -> None:
    """Sign `path`'s trailer as vmsnap did before the tables' digest: the HMAC covers the
    tables themselves."""
    from testbed.craft import trailer_parts, write_trailer

    body_offset, stream_end, _, tables = trailer_parts(path)
    md.pop("signature", None)
    js = json.dumps(md, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(key, b"vmsnap trailer hmac v1\0" + struct.pack("<Q", len(js)) + js,
                   hashlib.sha256)
    mac.update(tables)
    md["signature"] = {"key_id": key_id(key), "hmac": mac.hexdigest()}
    write_trailer(path, body_offset, stream_end,
                  json.dumps(md, separators=(",", ":"), sort_keys=True).encode(), tables)


def test_files_signed_before_the_digest(keydir):
    """A file signed over its tables themselves (before "tables_sha256") still verifies, its
    tables read first; altered, it does not; a new signature stripped of its digest is not
    taken for an old one."""
    from testbed.craft import reseal, trailer_parts

    key = load_or_create_key()
    path = keydir.parent / "f"
    path.write_bytes(image(key))
    md = trailer_parts(path)[2]
    _sign_v1(path, key, dict(md))
    trailer, reads = _asked(path.read_bytes())
    assert trailer.signature.tables_sha256 is None
    assert trust_of(trailer, tables=False).trusted and len(reads) > 3  # tables read
    reseal(path, lambda m: m.update(created="2000-01-01T00:00:00Z"))
    assert "altered" in trust_of(decode_trailer_bytes(path.read_bytes())).reason
    path.write_bytes(image(key))
    reseal(path, lambda m: m["signature"].pop("tables_sha256"))
    assert "altered" in trust_of(decode_trailer_bytes(path.read_bytes())).reason


@pytest.mark.parametrize("digest", ["00" * 31, "G" * 64, 7, "AB" * 32])
def test_malformed_table_digest_is_corrupt(keydir, digest):
    from testbed.craft import reseal

    path = keydir.parent / "f"
    path.write_bytes(image(load_or_create_key()))
    reseal(path, lambda m: m["signature"].update(tables_sha256=digest))
    with pytest.raises(CorruptTrailer, match="'signature' invalid"):
        decode_trailer_bytes(path.read_bytes())


def test_untrusted_needs_explicit_trust():
    argv = [QEMU, "-m", "128"]
    with pytest.raises(VmsnapError, match="--trust-command-line"):
        approve(argv, Trust(False, "not signed"), False, "f")
    assert approve(argv, Trust(False, "not signed"), True, "f") == os.path.realpath(QEMU)


@pytest.mark.parametrize("program", ["/bin/sh", "sh", "bash", "/usr/bin/env", "true"])
def test_only_qemu_system_runs_even_when_trusted(program):
    for trust in (True, False):
        with pytest.raises(VmsnapError, match="not a QEMU system emulator|not on PATH"):
            approve([program, "-c", "id"], TRUSTED, trust, "f")


def test_emulator_lookalikes(tmp_path):
    """Named qemu-system-* is not enough: a symlink to a shell, a script, or a binary that
    others could have replaced are all refused."""
    (tmp_path / "qemu-system-x86_64").symlink_to("/bin/sh")
    with pytest.raises(VmsnapError, match="not a QEMU system emulator"):
        qemu_emulator(str(tmp_path / "qemu-system-x86_64"))
    script = tmp_path / "qemu-system-aarch64"
    script.write_text("#!/bin/sh\nid\n")
    script.chmod(0o755)
    with pytest.raises(VmsnapError, match="not an executable program"):
        qemu_emulator(str(script))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    shutil.copy("/bin/true", shared / "qemu-system-riscv64")
    with pytest.raises(VmsnapError, match="could have replaced"):
        qemu_emulator(str(shared / "qemu-system-riscv64"))
    assert qemu_emulator("qemu-system-x86_64") == os.path.realpath(QEMU)


@pytest.mark.parametrize("args", [
    ["-netdev", "tap,id=n0,script=/tmp/x.sh"],
    ["-netdev", "tap,id=n0,script=no,downscript=/tmp/x.sh"],
    ["-netdev", "bridge,id=n0,br=br0,helper=/tmp/helper"],
    ["-net", "tap,script=/tmp/x"],
    ["-netdev", '{"type":"tap","id":"n0","script":"/tmp/x.sh"}'],
    ["-set", "netdev.n0.script=/tmp/x.sh"],
    ["-plugin", "/tmp/libevil.so"],
    ["--readconfig", "/tmp/qemu.cfg"],
], ids=lambda a: a[-1][:30])
def test_program_options_refused_unless_trusted_explicitly(args):
    argv = [QEMU, "-m", "128", *args]
    assert program_options(argv)
    with pytest.raises(VmsnapError, match="makes QEMU run a program"):
        approve(argv, TRUSTED, False, "f")
    approve(argv, TRUSTED, True, "f")  # the user read it and takes responsibility


def test_harmless_options_pass():
    argv = [QEMU, "-netdev", "tap,id=n0,script=no,downscript=no", "-name", "myscript=x",
            "-drive", "file=/var/lib/script.img,if=virtio", "-run-with", "user=nobody"]
    assert program_options(argv) == []
    approve(argv, TRUSTED, False, "f")


@pytest.mark.parametrize("bad", ["a\0b", "\ud800"], ids=["nul", "lone-surrogate"])
def test_unpassable_argument_is_one_error(bad):
    with pytest.raises(VmsnapError, match="cannot be passed to a program"):
        approve([QEMU, "-name", bad], TRUSTED, True, "f")


def test_key_dir_defaults(monkeypatch):
    from vmsnap.hostkey import key_dir

    monkeypatch.delenv(KEY_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", "/x/state")
    expected = "/var/lib/vmsnap" if os.geteuid() == 0 else "/x/state/vmsnap"
    assert key_dir() == expected
    assert Path(expected).is_absolute()
