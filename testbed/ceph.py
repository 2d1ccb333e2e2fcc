"""The one-node Ceph of scripts/ceph.sh for tests and benchmarks: its client environment,
its daemons' pids, and removal of what a test or benchmark stored in it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ceph.sh"
BUCKET = "vmsnap"
POOL = "rbd"


def ceph_sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


def state_dir() -> Path:
    return Path(os.environ.get("VMSNAP_CEPH_DIR", ROOT / "build" / "ceph")).resolve()


def client_env() -> dict[str, str]:
    """CEPH_CONF, AWS_ENDPOINT_URL and the S3 keys of the cluster (`ceph.sh env`)."""
    out = ceph_sh("env")
    if out.returncode:
        raise RuntimeError(f"scripts/ceph.sh env failed: {out.stderr.strip()}")
    env = {}
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


def daemon_pid(name: str) -> int:
    """The pid of daemon `name` (mon, mgr, osd, radosgw) from its pid file."""
    return int((state_dir() / "run" / f"{name}.pid").read_text())


def remove_image(pool: str, name: str) -> None:
    """Remove an RBD image with its snapshots (and its metadata); gone already is fine.
    A watch left by a client that died with the OSD down (it lingers 30 s after the OSD is
    back) is ended by blocklisting that client, as `rbd rm` advises: call this only when no
    process of the test still uses the image."""
    import rbd

    from vmsnap.targets.ceph import cluster, ioctx

    io = ioctx(pool)
    try:
        with rbd.Image(io, name) as img:
            for snap in img.list_snaps():
                img.remove_snap(snap["name"])
            me = cluster().get_instance_id()
            stale = [w["addr"] for w in img.watchers_list() if w["id"] != me]
        for addr in stale:
            cmd = {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr}
            ret, _, why = cluster().mon_command(json.dumps(cmd), b"")
            if ret:
                raise RuntimeError(f"cannot blocklist {addr}: {why}")
        rbd.RBD().remove(io, name)
    except rbd.ImageNotFound:
        pass
    finally:
        io.close()


def remove_objects(bucket: str, prefix: str) -> None:
    """Delete every S3 object under `prefix`."""
    import boto3

    s3 = boto3.client("s3")  # from the environment as it is now
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
