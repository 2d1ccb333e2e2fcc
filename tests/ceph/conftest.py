"""The one-node Ceph (scripts/ceph.sh) for the tests of rbd: and s3:// targets: started once
per session when a test here needs it, stopped at the end unless it was already running."""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ceph.sh"
BUCKET = "vmsnap"
POOL = "rbd"


def _ceph(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="session")
def ceph_env():
    """Environment variables of a client of the running test cluster. Test sessions share
    the cluster (shared flock on DIR.users); the last one out stops it if a test session
    started it."""
    users_path = Path(os.environ.get("VMSNAP_CEPH_DIR", ROOT / "build" / "ceph")).resolve()
    users = open(f"{users_path}.users", "a")  # noqa: SIM115 - held for the session
    fcntl.flock(users, fcntl.LOCK_SH)
    marker = Path(f"{users_path}.started-by-tests")
    if _ceph("status").returncode != 0:
        marker.touch()
    started = _ceph("start")
    assert started.returncode == 0, f"scripts/ceph.sh start failed: {started.stderr}"
    env = {}
    for line in _ceph("env").stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if marker.exists():
            _ceph("stop")
            marker.unlink()
    except BlockingIOError:
        pass  # another session still uses it
    finally:
        users.close()


@pytest.fixture
def rbd_url(ceph_env):
    """A fresh image name; the image (with its snapshots and metadata) is removed after."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield f"rbd:{POOL}/{name}"
    remove_image(POOL, name)


@pytest.fixture
def s3_url(ceph_env):
    """A fresh key under its own prefix; every object under that prefix (manifest, chunks of
    every save, the .hot note) is deleted after."""
    prefix = f"t-{uuid.uuid4().hex[:12]}/"
    yield f"s3://{BUCKET}/{prefix}vm.snap"
    remove_objects(BUCKET, prefix)


def remove_image(pool: str, name: str) -> None:
    import rbd

    from vmsnap.targets.ceph import ioctx

    io = ioctx(pool)
    try:
        with rbd.Image(io, name) as img:
            for snap in img.list_snaps():
                img.remove_snap(snap["name"])
        rbd.RBD().remove(io, name)
    except rbd.ImageNotFound:
        pass


def remove_objects(bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")  # from the environment now (a test may have broken its own)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
