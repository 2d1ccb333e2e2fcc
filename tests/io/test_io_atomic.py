import os
import stat
import subprocess
import sys

import pytest

from vmsnap.io import AtomicFile, FileLockedError


def test_commit_replaces_and_perms(tmp_path):
    final = tmp_path / "snap"
    final.write_bytes(b"old")
    with AtomicFile(final) as af:
        assert os.path.exists(af.partial_path)
        assert stat.S_IMODE(os.stat(af.partial_path).st_mode) == 0o600
        os.pwrite(af.fd, b"new contents", 0)
        assert final.read_bytes() == b"old"
        af.commit()
    assert final.read_bytes() == b"new contents"
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert not os.path.exists(str(final) + ".partial")


def test_abort_keeps_old_file(tmp_path):
    final = tmp_path / "snap"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), AtomicFile(final) as af:
        os.pwrite(af.fd, b"garbage", 0)
        raise RuntimeError("boom")
    assert final.read_bytes() == b"old"
    assert not os.path.exists(af.partial_path)
    # exit without commit = abort as well
    with AtomicFile(final) as af:
        os.pwrite(af.fd, b"x", 0)
    assert final.read_bytes() == b"old" and not os.path.exists(af.partial_path)


def test_locked_partial_refused_stale_reclaimed(tmp_path):
    final = tmp_path / "snap"
    a = AtomicFile(final).open()
    with pytest.raises(FileLockedError):
        AtomicFile(final).open()
    # another process holding the lock is refused too
    a.abort()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from vmsnap.io import AtomicFile; "
         f"a=AtomicFile({str(final)!r}).open(); print('ok', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, cwd=os.getcwd(),
    )
    try:
        assert child.stdout.readline().strip() == b"ok"
        with pytest.raises(FileLockedError, match="another process"):
            AtomicFile(final).open()
    finally:
        child.kill()
        child.wait()
    # the child died without cleaning up: stale partial, reclaimed
    assert os.path.exists(str(final) + ".partial")
    with AtomicFile(final) as af:
        os.pwrite(af.fd, b"fresh", 0)
        af.commit()
    assert final.read_bytes() == b"fresh"
