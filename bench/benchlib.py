"""What the benchmark scripts share: a /proc process table, memory fields and start time of a
process, running the medray CLI with --json, and rewriting one section of BENCHMARKS.md. Linux
only (reads /proc)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MEDRAY = str(Path(sys.executable).parent / "medray")


class RunFailed(Exception):
    """One CLI run failed; the benchmark records it and goes on with the other parts."""


def medray(env: dict[str, str], *args: str) -> tuple[dict[str, Any], float]:
    """Run ``medray ARGS --json`` in ``env``: its JSON result and the wall-clock seconds."""
    started = time.perf_counter()
    proc = subprocess.run([MEDRAY, *args, "--json"], capture_output=True, text=True, env=env,
                          check=False)  # noqa: S603 - our own CLI
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"medray {' '.join(args)} failed:\n{proc.stderr[-4000:]}", flush=True)
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        if "memory" in proc.stderr.lower() and "kill" in proc.stderr.lower():
            reason = "killed by Ray's out-of-memory monitor (the shared machine ran out of RAM)"
        raise RunFailed(f"`medray {args[0]}` exited {proc.returncode}: {reason[:200]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command line, CPU ticks used so far: utime + stime)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            out[int(entry)] = (int(rest[1]), cmd, int(rest[11]) + int(rest[12]))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return out


def family(table: dict[int, tuple[int, str, int]], roots: set[int]) -> set[int]:
    """The processes in ``roots`` and all their descendants, from a :func:`proc_table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def smaps(pid: int) -> dict[str, int]:
    """Every kB field of /proc/PID/smaps_rollup ("Pss", "Rss", "Pss_Anon"...); {} once the
    process is gone. One read: the kernel walks the process's page tables for each."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def write_section(title: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace (or add) the section '## TITLE' of BENCHMARKS.md; other sections stay."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else (
        old.rstrip("\n") + "\n\n" + text)
    path.write_text(new)


def process_started_at(pid: int) -> float | None:
    """When the OS started process ``pid``, in epoch seconds (10 ms ticks); None once gone."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
