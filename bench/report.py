"""Tables (rich), ratios against the peers and the PNG chart (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

REFERENCES = {"exec-cat": "exec:cat", "qemu10": "QEMU10", "fio": "fio",
              "fio-4j": "fio 4j"}


def ratios(summary: dict) -> dict:
    """vmsnap median / reference median, for save and restore, from the same run."""
    out: dict = {}
    for name, s in summary.items():
        if not name.startswith("vmsnap"):
            continue
        for ref in REFERENCES:
            r = summary.get(ref)
            for key in ("save_s", "restore_s"):
                if r and key in r and key in s and r[key]["median"] > 0:
                    out.setdefault(name, {}).setdefault(ref, {})[key] = round(
                        s[key]["median"] / r[key]["median"], 3)
    return out


def _t(s: dict | None) -> str:
    if not s:
        return "-"
    spread = f" [{s['min']:.2f}-{s['max']:.2f}]" if s["n"] > 1 else ""
    return f"{s['median']:.2f}{spread}"


def _mb(s: dict | None) -> str:
    return "-" if not s else f"{s['median'] / 1e6:,.0f}"


def _frac(s: dict | None, ram: int) -> str:
    return "-" if not s else f"{s['median'] / ram:.2f}"


def print_tables(console: Console, record: dict) -> None:
    for key, sc in record["scenarios"].items():
        table = Table(title=f"{sc['label']} — medians [min-max] of {record['reps']} rep(s)")
        for col in ("method", "save s", "restore s", "file MB", "file/RAM", "alloc MB", "cache +MB",
                    "CPU s save/rest", "RSS MB save/rest", "ok"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for name, s in sc["summary"].items():
            cpu = rss = "-"
            if "save_cpu_s" in s:  # (no restore figures where QEMU loaded vmsnap's file)
                cpu = "/".join(f"{s[k]['median']:.2f}" if k in s else "-"
                               for k in ("save_cpu_s", "restore_cpu_s"))
                rss = "/".join(f"{s[k]['median'] / 1e6:.0f}" if k in s else "-"
                               for k in ("save_max_rss_bytes", "restore_max_rss_bytes"))
            ok = f"{s['ok']}/{s['ok'] + s['failed']}"
            table.add_row(record["methods"].get(name, name), _t(s.get("save_s")),
                          _t(s.get("restore_s")), _mb(s.get("apparent_bytes")),
                          _frac(s.get("apparent_bytes"), sc["ram_bytes"]),
                          _mb(s.get("allocated_bytes")), _mb(s.get("cache_growth_bytes")),
                          cpu, rss, ok if not s["failed"] else f"[red]{ok}")
        console.print(table)
        rates = [s["dirty_rate_mb_s"]["median"] for s in sc["summary"].values()
                 if "dirty_rate_mb_s" in s]
        if rates:
            console.print(f"  guest dirty rate measured by QEMU before each live save "
                          f"(calc-dirty-rate): {min(rates):.0f}-{max(rates):.0f} MB/s")
        for name, s in sc["summary"].items():
            if "restore_s" not in s or not ({"restore_load_s", "restore_qemu_cpu_s"} & set(s)):
                continue
            whole = s["restore_s"]["median"]
            parts = [f"restore {whole:.2f} s"]
            if "restore_load_s" in s:
                load = s["restore_load_s"]["median"]
                parts.append(f"loading {load:.2f} s (from vmsnap's checks done to QEMU loaded), "
                             f"vmsnap's start-up, open, QMP, checks {whole - load:.2f} s")
            if "restore_qemu_cpu_s" in s:
                parts.append(f"QEMU's CPU meanwhile {s['restore_qemu_cpu_s']['median']:.2f} s")
            if "restore_qemu_main_cpu_s" in s:
                parts.append(f"of it its main thread {s['restore_qemu_main_cpu_s']['median']:.2f}"
                             f" s; guest RAM in huge pages "
                             f"{s['restore_qemu_thp_mb']['median']:,.0f} MB")
            console.print(f"  {record['methods'].get(name, name)}: " + "; ".join(parts))
        for name, why in sc["skipped"].items():
            console.print(f"  [dim]{record['methods'].get(name, name)}: skipped: {why}")
        for name, s in sc["summary"].items():
            for err in s["errors"]:
                console.print(f"  [red]{name}[/red]: {err}")
        if sc.get("ratios"):
            rt = Table(title=f"{key}: vmsnap time / peer time (same run's medians; <1 = faster)")
            rt.add_column("vmsnap")
            for label in REFERENCES.values():
                rt.add_column(f"save / {label}", justify="right")
                rt.add_column(f"restore / {label}", justify="right")
            for name, by_ref in sc["ratios"].items():
                cells = []
                for ref in REFERENCES:
                    for k in ("save_s", "restore_s"):
                        v = by_ref.get(ref, {}).get(k)
                        cells.append("-" if v is None else f"{v:.2f}")
                rt.add_row(name, *cells)
            console.print(rt)


def chart(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(record["scenarios"].items())
    if not scen:
        return
    fig, axes = plt.subplots(2, len(scen), figsize=(5.5 * len(scen), 7), squeeze=False)
    for col, (_key, sc) in enumerate(scen):
        names = [n for n, s in sc["summary"].items() if "save_s" in s]
        for row, metric in enumerate(("save_s", "restore_s")):
            ax = axes[row][col]
            med = [sc["summary"][n][metric]["median"] for n in names]
            lo = [m - sc["summary"][n][metric]["min"] for m, n in zip(med, names, strict=True)]
            hi = [sc["summary"][n][metric]["max"] - m for m, n in zip(med, names, strict=True)]
            colors = ["tab:green" if n.startswith("vmsnap") else "tab:gray" if n.startswith("fio")
                      else "tab:blue" for n in names]
            ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4, color=colors)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(("save, durable" if row == 0 else "restore, cold cache") + " (s)")
            if row == 0:
                ax.set_title(sc["label"], fontsize=9)
    fig.suptitle(f"vmsnap bench {record['started']} ({record['reps']} rep(s), median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _med(sc: dict | None, method: str, key: str) -> float | None:
    s = (sc or {}).get("summary", {}).get(method, {}).get(key)
    return s["median"] if s else None


def targets(record: dict) -> list[dict]:
    """Issue 5's targets, each evaluated from this run's medians for every vmsnap method."""
    out: list[dict] = []
    sc = record["scenarios"]

    def add(what: str, method: str, value: float | None, limit: float, note: str = "") -> None:
        if value is not None:
            out.append({"target": what, "method": method, "value": round(value, 3),
                        "limit": limit, "met": value <= limit, "note": note})

    for m in {n for s in sc.values() for n in s["summary"] if n.startswith("vmsnap")}:
        paused = sc.get("paused")
        r = (paused or {}).get("ratios", {}).get(m, {})
        for key, word in (("save_s", "save"), ("restore_s", "restore")):
            for ref, lim in (("qemu10", 1.1), ("exec-cat", 0.5 if key == "save_s" else 0.33),
                             ("fio", 1.15)):
                add(f"paused {word} / {ref}", m, r.get(ref, {}).get(key), lim)
        zero = sc.get("zero")
        if paused and zero:
            # "tracks used RAM, not RAM size": the zero guest's time must sit below the
            # geometric mean of the two predictions (scaled by used bytes vs by RAM size)
            used = zero["used_bytes"] / paused["used_bytes"]
            ram = zero["ram_bytes"] / paused["ram_bytes"]
            for key, word in (("save_s", "save"), ("restore_s", "restore")):
                tz, tp = _med(zero, m, key), _med(paused, m, key)
                if tz is not None and tp:
                    add(f"mostly-zero {word} / paused {word}", m, tz / tp,
                        round((used * ram) ** 0.5, 3),
                        f"used-RAM prediction {used:.2f}, RAM-size prediction {ram:.2f}")
        live = sc.get("live")
        if live:
            app = _med(live, m, "apparent_bytes")
            if app is not None:
                add("live file / RAM", m, app / live["ram_bytes"],
                    round(1 + (64 << 20) / live["ram_bytes"], 3), "RAM + 64 MiB of metadata")
        for key, s in sc.items():
            cpu = _med(s, m, "save_cpu_s")
            run = s["runs"].get(m) or [{}]
            present = next((x.get("present_bytes") for x in run if x.get("present_bytes")),
                           None)
            if cpu is not None and present:
                add(f"{key}: vmsnap save CPU-s per GiB", m, cpu / (present / (1 << 30)), 0.3,
                    "target is for channels > 0 on a tmpfs target")
            growth, alloc = _med(s, m, "cache_growth_bytes"), _med(s, m, "allocated_bytes")
            if growth is not None and alloc:
                add(f"{key}: |page-cache growth| / file", m, abs(growth) / alloc, 0.05,
                    "shared host: other processes' reads add noise")
    for sname, s in sc.items():
        if s["live"] and _med(s, "exec-cat", "apparent_bytes") is not None:
            out.append({"target": "live file / RAM (for reference)", "method": "exec-cat",
                        "value": round(_med(s, "exec-cat", "apparent_bytes") / s["ram_bytes"], 3),
                        "limit": None, "met": None, "note": f"{sname}: a stream grows"})
    return out


def print_targets(console: Console, rows: list[dict]) -> None:
    if not rows:
        return
    table = Table(title="Issue 5 targets (this run)")
    for col in ("target", "method", "value", "limit", "met", "note"):
        table.add_column(col, justify="right" if col in ("value", "limit") else "left")
    for r in rows:
        met = "-" if r["met"] is None else "[green]yes" if r["met"] else "[red]no"
        table.add_row(r["target"], r["method"], f"{r['value']:.3f}",
                      "-" if r["limit"] is None else f"{r['limit']:g}", met, r["note"])
    console.print(table)
