"""Live saves that finish: auto-converge throttling, and a downtime limit chosen from what
the save measures, so a guest that dirties RAM fast cannot keep a live save going for long.

QEMU stops a pre-copy migration once the dirty RAM left fits its downtime limit at the
measured bandwidth. With its defaults (300 ms, throttle 20 % + 10 % per round) a guest
dirtying 150 MB/s over one stream took 67-83 s to save here. vmsnap
- turns auto-converge on and starts it harder (QEMU throttles the vCPUs once the guest dirties
  more than half of what a round sends, two rounds in a row);
- times the first round (one pass over RAM: about what a paused save takes) and measures
  the guest's dirty rate at its end: what is dirty again over the first round's time (QEMU
  reports its own rate only after a second-long period, later, so that one is used once
  there);
- finishes the save by raising the downtime limit to what the RAM still dirty takes at
  QEMU's own measured bandwidth (plus a margin), as soon as either more rounds cannot pay
  off (the guest dirties at least STALL_RATIO of the bandwidth: each round would at best
  halve what is left) or the save has run BUDGET x the first round. Again at each poll
  until QEMU switches over: the guest is stopped and the rest sent, as a paused save
  would. A user's --downtime-limit is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import VmsnapError
from ..stream.constants import TARGET_PAGE_SIZE
from .modes import UNLIMITED_BANDWIDTH
from .qmp import Monitor

DEFAULT_DOWNTIME_MS = 300
#: QEMU refuses downtime limits above 2000 s.
MAX_DOWNTIME_MS = 2_000_000
#: Throttle sooner and harder than QEMU's 20 % + 10 % per round.
THROTTLE = {"cpu-throttle-initial": 40, "cpu-throttle-increment": 20}
#: From this multiple of the first round's time on, finish the save.
BUDGET = 1.5
#: A guest dirtying at least this fraction of the bandwidth: finish after the first round.
STALL_RATIO = 0.5
#: The limit set is this much above the measured need (the guest dirties on meanwhile).
MARGIN = 1.25
#: The highest --bandwidth: what every other save sets, effectively unlimited.
MAX_MIB_S = UNLIMITED_BANDWIDTH >> 20


@dataclass(frozen=True)
class LiveLimits:
    """What a user may fix for a live save: the guest's longest final stop, and a cap on
    the pre-copy rounds' throughput (the guest runs meanwhile and shares the disk; QEMU
    sends the final stop's pages at full speed)."""

    downtime_ms: int | None = None
    bandwidth_mib_s: int | None = None

    def check(self, live: bool) -> None:
        if self.downtime_ms is not None and not 1 <= self.downtime_ms <= MAX_DOWNTIME_MS:
            raise VmsnapError(f"--downtime-limit must be 1..{MAX_DOWNTIME_MS} ms, "
                              f"not {self.downtime_ms}")
        if self.bandwidth_mib_s is not None and not 1 <= self.bandwidth_mib_s <= MAX_MIB_S:
            raise VmsnapError(f"--bandwidth must be 1..{MAX_MIB_S} MiB/s, "
                              f"not {self.bandwidth_mib_s}")
        for option, value in (("--downtime-limit", self.downtime_ms),
                              ("--bandwidth", self.bandwidth_mib_s)):
            if value is not None and not live:
                raise VmsnapError(f"{option} is for --live saves")

    def parameters(self) -> dict[str, Any]:
        """Migration parameters of a live save (capabilities: modes.capabilities)."""
        params = {"downtime-limit": self.downtime_ms or DEFAULT_DOWNTIME_MS, **THROTTLE}
        if self.bandwidth_mib_s:
            params["max-bandwidth"] = self.bandwidth_mib_s << 20
        return params


#: QEMU's own behaviour: vmsnap's converger chooses the downtime limit, no cap.
NO_LIMITS = LiveLimits()


@dataclass
class Converger:
    """Watches a live save's rounds, finishes it within the budget, and keeps the figures
    QEMU stops reporting once the save is over (dirty rate, throttle)."""

    started: float
    user_limit_ms: int | None = None
    first_round_s: float | None = None
    limit_ms: int | None = None
    dirty_bytes_s: float | None = None
    throttle_pct: int = 0

    def wanted_limit(self, info: dict[str, Any], now: float) -> int | None:
        """A higher downtime limit to set now (ms), or None. Once the budget is spent it
        grows at least 1.5x per poll until QEMU switches over, whatever QEMU's estimates."""
        ram = info.get("ram", {})
        if self.first_round_s is None and ram.get("dirty-sync-count", 0) >= 2:
            self.first_round_s = now - self.started
            if not self.dirty_bytes_s:  # dirty again since the first round's pages went
                self.dirty_bytes_s = ram.get("remaining", 0) / max(self.first_round_s, 1e-3)
        if self.user_limit_ms is not None or self.first_round_s is None:
            return None
        bandwidth = ram.get("mbps", 0) * 1e6 / 8  # QEMU's own estimate, bytes/s
        if bandwidth <= 0:
            return None
        stalled = (self.dirty_bytes_s or 0) >= STALL_RATIO * bandwidth
        if not stalled and now - self.started < BUDGET * self.first_round_s:
            return None
        need: int = math.ceil(ram.get("remaining", 0) / bandwidth * 1000 * MARGIN)
        if self.limit_ms is not None:
            need = max(need, math.ceil(self.limit_ms * 1.5))
        need = min(MAX_DOWNTIME_MS, need)
        if need <= (self.limit_ms or DEFAULT_DOWNTIME_MS):
            return None
        self.limit_ms = need
        return need

    async def step(self, client: Monitor, info: dict[str, Any], now: float) -> None:
        if info.get("status") != "active":
            return
        ram = info.get("ram", {})
        if ram.get("dirty-pages-rate"):
            self.dirty_bytes_s = ram["dirty-pages-rate"] * ram.get("page-size", TARGET_PAGE_SIZE)
        self.throttle_pct = max(self.throttle_pct, info.get("cpu-throttle-percentage", 0))
        limit = self.wanted_limit(info, now)
        if limit is not None:
            await client.execute("migrate-set-parameters", {"downtime-limit": limit})

    def figures(self) -> dict[str, Any]:
        """For the save's result: what vmsnap measured and chose."""
        return {"dirty_mb_s": round(self.dirty_bytes_s / 1e6, 1) if self.dirty_bytes_s
                else None, "throttle_pct": self.throttle_pct,
                "downtime_limit_ms": self.limit_ms or self.user_limit_ms
                or DEFAULT_DOWNTIME_MS}
