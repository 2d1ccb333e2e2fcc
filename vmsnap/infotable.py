"""`vmsnap info` on a terminal: the snapshot's summary and blocks as rich tables (the only
verb that needs rich without a progress bar, so rich loads only here)."""

from __future__ import annotations

import shlex

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .ops.info import SnapshotInfo


def print_info(info: SnapshotInfo) -> None:
    console = Console()
    summary = Table.grid(padding=(0, 2))
    for key in ("path", "format", "integrity", "qemu_version", "machine_type", "created"):
        summary.add_row(key.replace("_", " "), _text(info[key]))
    summary.add_row("RAM", f"{info['ram_bytes']:,} bytes ({info['present_bytes']:,} present)")
    allocated = info["allocated_size"]
    summary.add_row("file size", f"{info['apparent_size']:,} apparent"
                    + (f", {allocated:,} allocated" if allocated is not None else ""))
    if info["command_line"]:
        summary.add_row("command line", _text(shlex.join(info["command_line"])))
        trust = ("trusted: " if info["command_line_trusted"] else "NOT trusted: ") \
            + (info["command_line_trust"] or "")
        if info["command_line_runs_programs"]:
            trust += "; makes QEMU run: " + ", ".join(info["command_line_runs_programs"])
        summary.add_row("relaunch", _text(trust))
    console.print(summary)
    table = Table("block", "used length", "present pages", "zero pages")
    for b in info["blocks"]:
        table.add_row(_text(b["name"]), f"{b['used_length']:#x}", str(b["present_pages"]),
                      str(b["zero_pages"]))
    console.print(table)


def _text(value: object) -> Text:
    """`value` shown as it is: no rich markup, control characters and undecodable bytes
    escaped (a file's block names and command line must not drive the terminal)."""
    return Text("".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(value)))
