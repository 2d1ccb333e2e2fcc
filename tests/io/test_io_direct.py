import errno
import os

import numpy as np
import pytest

from vmsnap.io import AlignedBuffer, DirectFile, IOEngineError
from vmsnap.io import direct as direct_mod

DISK_DIRS = ["/var/tmp", "/dev/shm"]


@pytest.fixture(params=DISK_DIRS, ids=["disk", "shm"])
def fpath(request, tmp_path):
    d = request.param
    if not os.path.isdir(d):
        pytest.skip(f"{d} missing")
    p = os.path.join(d, f"vmsnap-test-{os.getpid()}-{tmp_path.name}.bin")
    yield p
    if os.path.exists(p):
        os.unlink(p)


def test_write_read_roundtrip_direct(fpath):
    rng = np.random.default_rng(1)
    with DirectFile(fpath, writable=True, create=True) as f:
        assert f.direct  # both ext4 and this kernel's tmpfs accept O_DIRECT
        f.truncate(64 << 20)
        buf = AlignedBuffer(12 << 20)  # > MAX_IO_BYTES: several syscalls
        buf.array[:] = rng.integers(0, 256, buf.size, dtype=np.uint8)
        assert f.write_at(1 << 20, [buf.view]) == buf.size
        out = AlignedBuffer(buf.size)
        f.read_into(1 << 20, [out.view])
        assert bytes(out.view) == bytes(buf.view)
        # unaligned memory goes through the buffered fd transparently
        raw = bytes(range(256)) * 16
        f.write_at(4096 * 3, [raw, raw])
        assert f.pread_meta(4096 * 3, 8192) == raw * 2
        f.pwrite_meta(5, b"hello")
        assert f.pread_meta(5, 5) == b"hello"
        assert f.size() == 64 << 20


def test_read_past_eof_is_error(fpath):
    with DirectFile(fpath, writable=True, create=True) as f:
        f.truncate(8192)
        buf = AlignedBuffer(3 * 4096)
        with pytest.raises(IOEngineError, match="unexpected end of file"):
            f.read_into(0, [buf.view])


def test_partial_writes_and_reads(monkeypatch, tmp_path):
    p = tmp_path / "f"
    real_pw, real_pr = os.pwritev, os.preadv

    def short_pw(fd, bufs, off):
        bufs = list(bufs)
        return real_pw(fd, [bufs[0][: max(1, len(bufs[0]) // 3)]], off)

    def short_pr(fd, bufs, off):
        bufs = list(bufs)
        return real_pr(fd, [bufs[0][: max(1, len(bufs[0]) // 3)]], off)

    monkeypatch.setattr(direct_mod.os, "pwritev", short_pw)
    monkeypatch.setattr(direct_mod.os, "preadv", short_pr)
    data = [os.urandom(5000), os.urandom(7000)]
    with DirectFile(p, writable=True, create=True, direct=False) as f:
        assert f.write_at(100, data) == 12000
        a, b = bytearray(6000), bytearray(6000)
        f.read_into(100, [a, b])
        assert bytes(a + b) == b"".join(data)


def test_fallback_when_o_direct_refused(monkeypatch, tmp_path, caplog):
    real_open = os.open

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_mod.os, "open", fake_open)
    calls = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(direct_mod.os, "posix_fadvise",
                        lambda fd, o, n, adv: (calls.append((o, n, adv)),
                                               real_fadvise(fd, o, n, adv)))
    p = f"/dev/shm/vmsnap-fallback-{os.getpid()}"
    try:
        with caplog.at_level("WARNING"):
            f = DirectFile(p, writable=True, create=True)
        assert not f.direct and "O_DIRECT refused" in f.fallback_reason
        assert sum("buffered I/O" in r.message for r in caplog.records) == 1
        buf = AlignedBuffer(1 << 20)
        buf.array[:] = 7
        f.write_at(0, [buf.view])
        f.read_into(0, [buf.view])
        assert (0, 1 << 20, os.POSIX_FADV_DONTNEED) in calls
        f.close()
    finally:
        os.unlink(p)


@pytest.mark.parametrize("op", ["write", "read"])
def test_fallback_on_einval_at_first_io(monkeypatch, tmp_path, op):
    """A filesystem that takes O_DIRECT at open but refuses its first write or read: the
    file turns buffered, says why, and the request is done all the same."""
    import fcntl

    name = "pwritev" if op == "write" else "preadv"
    real = getattr(os, name)
    state = {"fail": True}

    def refuse_once(fd, bufs, off):
        if state["fail"] and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            state["fail"] = False
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    with DirectFile(tmp_path / "g", writable=True, create=True) as f:
        assert f.direct
        buf = AlignedBuffer(8192)
        buf.array[:] = 3
        if op == "read":
            f.write_at(0, [buf.view])
            buf.array[:] = 0
        monkeypatch.setattr(direct_mod.os, name, refuse_once)
        assert (f.write_at if op == "write" else f.read_into)(0, [buf.view]) == 8192
        assert not state["fail"]  # the O_DIRECT request was refused
        assert not f.direct and f"{op} refused" in f.fallback_reason
        assert f.pread_meta(0, 8192) == b"\x03" * 8192 == bytes(buf.view)
