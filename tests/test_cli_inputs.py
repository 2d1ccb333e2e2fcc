"""Bad arguments that need no QEMU and no snapshot: a QMP address that cannot be a socket or
is no QMP monitor, an XML file that is not text, a directory where FILE goes. Each ends in
one line naming the problem, a non-zero exit and no traceback."""

from __future__ import annotations

import socket
import threading

import pytest
from test_cli_errors import fails_with, run


@pytest.fixture
def garbage_socket(workdir):
    """A unix socket whose server greets with something that is not QMP."""
    path = workdir / "garbage.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.sendall(b"220 smtp.example ESMTP\r\n")
                conn.recv(1024)

    threading.Thread(target=serve, daemon=True).start()
    yield path
    listener.close()


@pytest.mark.parametrize(("address", "words"), [
    ("127.0.0.1:99999", ["127.0.0.1:99999", "port must be 0-65535"]),  # was: OverflowError
    ("/tmp/" + "x" * 200, ["AF_UNIX path too long"]),  # was: "timed out"
    ("WORKDIR", ["cannot connect", "Connection refused"]),  # a directory
    ("WORKDIR/none.sock", ["none.sock", "No such file"]),
], ids=["port-range", "long-path", "directory", "missing"])
@pytest.mark.parametrize("verb", ["save", "restore"])
def test_qmp_address_that_is_no_socket(workdir, verb, address, words, request):
    address = address.replace("WORKDIR", str(workdir))
    if verb == "save":
        args = ("save", "--qmp", address, workdir / "vm.snap")
    else:  # the file is opened first: a real one (made once per session with QEMU 7.2)
        args = ("restore", request.getfixturevalue("small_snapshot"), "--qmp", address)
    fails_with(run(*args), *words)


def test_socket_that_is_not_qmp(garbage_socket, workdir):
    fails_with(run("save", "--qmp", garbage_socket, workdir / "vm.snap"),
               "not a usable QMP monitor", "Greeting")
    assert not (workdir / "vm.snap").exists() and not (workdir / "vm.snap.partial").exists()


@pytest.mark.parametrize("verb", ["restore", "export"])
def test_xml_that_is_not_text(workdir, verb):
    xml = workdir / "dom.xml"
    xml.write_bytes(b"\xff\xfe\x00<domain/>")  # was: UnicodeDecodeError, a traceback
    args = (("restore", workdir / "vm.snap", "--xml", xml) if verb == "restore"
            else ("export", "--libvirt", workdir / "vm.snap", workdir / "vm.img", "--xml", xml))
    fails_with(run(*args), "dom.xml", "not a domain XML")


@pytest.mark.parametrize("args", [
    ("save", "--qmp", "SOCK", "DIR"), ("save", "--force", "--qmp", "SOCK", "DIR"),
    ("receive", "DIR"), ("import", "STREAM", "DIR"), ("export", "STREAM", "DIR"),
], ids=" ".join)
def test_directory_where_the_file_goes(workdir, args):
    """Refused as a directory, --force or not (was: "DIR exists (use --force to overwrite)",
    then with --force "Is a directory")."""
    (workdir / "dir").mkdir()
    (workdir / "stream").write_bytes(b"")
    names = {"SOCK": workdir / "none.sock", "DIR": workdir / "dir", "STREAM": workdir / "stream"}
    fails_with(run(*(names.get(a, a) for a in args)), "Is a directory",
               str(workdir / "dir"))
    assert list((workdir / "dir").iterdir()) == []


def test_directory_as_the_stream_to_import(workdir):
    """Named (was: "[Errno 21] Is a directory", which said not which)."""
    (workdir / "dir").mkdir()
    fails_with(run("import", workdir / "dir", workdir / "vm.snap"), "Is a directory",
               str(workdir / "dir"))
    assert sorted(p.name for p in workdir.iterdir()) == ["dir"]
