"""libvirt save images in and out, without libvirt: a real QEMU stream wrapped the way libvirt
writes it (to a file, or to a FIFO with the final header rewritten through a second open),
imported, exported back, and every way a writer can fail."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from testbed.capture import capture
from testbed.transfer import VMSNAP
from vmsnap.errors import VmsnapError
from vmsnap.libvirt.image import import_stream
from vmsnap.stream.saveimage import HEADER_SIZE, encode_head, parse_data, parse_header

pytestmark = pytest.mark.qemu

XML = ("<domain type='kvm'><name>lv</name>"
       "<uuid>0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0</uuid></domain>")


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> bytes:
    return capture(tmp_path_factory.mktemp("lvimg") / "s.bin", memory_mb=64).read_bytes()


def vmsnap(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([VMSNAP, *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class LibvirtLikeWriter(threading.Thread):
    """Writes into a FIFO as libvirt does: partial header + XML + stream, close; then the
    final header through a second open. `cut` stops after that many stream bytes."""

    def __init__(self, fifo: Path, stream: bytes, cut: int | None = None,
                 final: bool = True):
        super().__init__(daemon=True)
        self.fifo, self.stream, self.cut, self.final = fifo, stream, cut, final
        self.head = encode_head(XML, was_running=False, complete=False)

    def run(self) -> None:
        try:
            with open(self.fifo, "wb") as f:
                f.write(self.head + self.stream[:self.cut])
            if self.final and self.cut is None:
                with open(self.fifo, "wb") as f:
                    f.write(parse_header(self.head).completed().encode())
        except BrokenPipeError:
            pass


def test_fifo_import_holds_back_final_header_then_exports(stream, workdir):
    fifo = workdir / "save.fifo"
    os.mkfifo(fifo, 0o600)
    writer = LibvirtLikeWriter(fifo, stream)
    writer.start()
    snap = workdir / "lv.vms"
    vmsnap("import", fifo, snap)
    writer.join(10)
    vmsnap("verify", snap)
    info = json.loads(vmsnap("info", "--json", snap).stdout)
    assert info["format"] == "vmsnap"
    # back to a libvirt image: same XML, complete magic, stream = the plain export
    image = workdir / "lv.img"
    vmsnap("export", "--libvirt", snap, image)
    plain = workdir / "plain.bin"
    vmsnap("export", snap, plain)
    data = image.read_bytes()
    h = parse_header(data)
    assert h.complete and not h.was_running
    assert parse_data(h, data[HEADER_SIZE:h.stream_offset]) == (XML, None)
    assert data[h.stream_offset:] == plain.read_bytes()
    assert oct(image.stat().st_mode & 0o777) == "0o600"
    # and a libvirt image file imports again (its header is already final)
    again = workdir / "again.vms"
    vmsnap("import", image, again)
    vmsnap("verify", again)
    # --xml overrides the stored XML
    xml2 = workdir / "other.xml"
    xml2.write_text(XML.replace("lv", "other"))
    vmsnap("export", "--libvirt", "--force", snap, image, "--xml", xml2)
    h = parse_header(image.read_bytes()[:HEADER_SIZE])
    assert "other" in parse_data(h, image.read_bytes()[HEADER_SIZE:h.stream_offset])[0]


def test_export_into_fifo_is_read_as_written(stream, workdir):
    snap = workdir / "s.vms"
    src = workdir / "s.bin"
    src.write_bytes(stream)
    vmsnap("import", src, snap)
    fifo = workdir / "restore.fifo"
    os.mkfifo(fifo, 0o600)
    out = bytearray()
    reader = threading.Thread(target=lambda: out.extend(fifo.read_bytes()), daemon=True)
    reader.start()
    xml = workdir / "d.xml"
    xml.write_text(XML)
    vmsnap("export", "--libvirt", snap, fifo, "--xml", xml)
    reader.join(10)
    h = parse_header(bytes(out))
    assert h.complete and h.was_running  # a plain stream's snapshot was running
    plain = workdir / "plain.bin"
    vmsnap("export", snap, plain)
    assert bytes(out[h.stream_offset:]) == plain.read_bytes()


def test_writer_killed_mid_stream_leaves_no_file(stream, workdir):
    fifo = workdir / "save.fifo"
    os.mkfifo(fifo, 0o600)
    writer = LibvirtLikeWriter(fifo, stream, cut=len(stream) // 2)
    writer.start()
    snap = workdir / "cut.vms"
    proc = vmsnap("import", fifo, snap, check=False)
    assert proc.returncode == 1
    assert "truncated" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not snap.exists() and not Path(f"{snap}.partial").exists()


def test_missing_final_header_is_refused(stream, workdir):
    fifo = workdir / "save.fifo"
    os.mkfifo(fifo, 0o600)
    writer = LibvirtLikeWriter(fifo, stream, final=False)
    writer.start()
    snap = workdir / "nofinal.vms"
    with pytest.raises(VmsnapError, match="did not finish its save image"):
        import_stream(str(fifo), str(snap), final_header_timeout=1.0)
    assert not snap.exists() and not Path(f"{snap}.partial").exists()


def test_bad_images_one_line_errors(stream, workdir):
    partial = workdir / "partial.img"
    partial.write_bytes(encode_head(XML, was_running=True, complete=False) + stream)
    compressed = workdir / "gz.img"
    head = bytearray(encode_head(XML, was_running=True))
    head[28] = 1
    compressed.write_bytes(bytes(head) + stream)
    plain = workdir / "plain.vms"
    (workdir / "s.bin").write_bytes(stream)
    vmsnap("import", workdir / "s.bin", plain)
    for args, message in [
        (("import", partial, workdir / "a.vms"), "libvirt save image is incomplete"),
        (("import", compressed, workdir / "b.vms"), "libvirt save image is compressed"),
        (("export", "--libvirt", plain, workdir / "c.img"), "not saved from a libvirt domain"),
        (("export", plain, workdir / "d.bin", "--xml", "x"), "--xml goes with --libvirt"),
    ]:
        proc = vmsnap(*args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not Path(str(args[-1])).exists()
