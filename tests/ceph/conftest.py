"""The one-node Ceph (scripts/ceph.sh) for the tests of rbd: and s3:// targets: started once
per session when a test here needs it, stopped at the end unless it was already running.
Every image and object a test stores is removed after it (rbd_url, s3_url)."""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

import pytest

from testbed.ceph import BUCKET, POOL, ceph_sh, client_env, remove_image, remove_objects, state_dir


@pytest.fixture(scope="session")
def ceph_env():
    """Environment variables of a client of the running test cluster. Test sessions share
    the cluster (shared flock on DIR.users); the last one out stops it if a test session
    started it."""
    users_path = state_dir()
    users = open(f"{users_path}.users", "a")  # noqa: SIM115 - held for the session
    fcntl.flock(users, fcntl.LOCK_SH)
    marker = Path(f"{users_path}.started-by-tests")
    if ceph_sh("status").returncode != 0:
        marker.touch()
    started = ceph_sh("start")
    assert started.returncode == 0, f"scripts/ceph.sh start failed: {started.stderr}"
    env = client_env()
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
            ceph_sh("stop")
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
