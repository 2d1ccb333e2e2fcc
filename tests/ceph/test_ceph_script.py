"""scripts/ceph.sh without a cluster: each state dir gets its own ports (fixed at creation)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from testbed.ceph import ROOT, SCRIPT


def ports(state: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("VMSNAP_MON_PORT", "VMSNAP_RGW_PORT")}
    return subprocess.run(["bash", str(SCRIPT), "ports"], capture_output=True, text=True,
                          env={**clean, "VMSNAP_CEPH_DIR": str(state), **env}, timeout=30)


def test_ports_per_state_dir(tmp_path):
    assert ports(ROOT / "build" / "ceph").stdout.split() == ["3300", "7480"]
    a, b = (ports(tmp_path / n).stdout.split() for n in ("a", "b"))
    assert a != b and a == ports(tmp_path / "a").stdout.split()  # stable
    for mon, rgw in (a, b):
        assert 17000 <= int(mon) < 19000 and int(rgw) == int(mon) + 1
    assert ports(tmp_path / "a", VMSNAP_MON_PORT="4000", VMSNAP_RGW_PORT="4001"
                 ).stdout.split() == ["4000", "4001"]
    made = tmp_path / "made"  # a cluster's ports are those it was created with
    made.mkdir()
    (made / "ceph.conf").write_text("mon host = v2:127.0.0.1:5000\n"
                                    "rgw frontends = beast endpoint=127.0.0.1:5001 "
                                    "tcp_nodelay=1\n")
    assert ports(made).stdout.split() == ["5000", "5001"]
    clash = ports(made, VMSNAP_RGW_PORT="6001")
    assert clash.returncode == 1 and len(clash.stderr.strip().splitlines()) == 1
    assert "uses ports 5000 and 5001" in clash.stderr
    assert not (tmp_path / "a").exists()  # `ports` creates nothing
