"""Shared reporting for the benchmark suites: every figure next to its baseline from the same run.

A benchmark calls ``record(benchmark, group=..., name=..., baseline=..., bytes_moved=..., ideal=...)``
after ``benchmark(...)``; at the end of the session one table per group is printed with the median time,
GB/s (when bytes are given), the speedup against the group's baseline and, where a cost model gives
one, the ideal speedup. ``DPVR_BENCH_OUT=path.md`` also writes the tables as markdown.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import pytest
import torch


@dataclass
class Row:
    group: str
    name: str
    median_s: float
    baseline: bool
    bytes_moved: int | None
    ideal: float | None
    note: str


_ROWS: list[Row] = []


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


@pytest.fixture
def record():
    def _record(benchmark, group: str, name: str, baseline: bool = False, bytes_moved: int | None = None,
                ideal: float | None = None, note: str = "") -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        _ROWS.append(Row(group, name, stats.stats.median, baseline, bytes_moved, ideal, note))

    return _record


def _tables() -> list[str]:
    out = [f"Machine: {machine()}", ""]
    for group in dict.fromkeys(r.group for r in _ROWS):
        rows = [r for r in _ROWS if r.group == group]
        base = next((r for r in rows if r.baseline), None)
        out.append(f"### {group}")
        out.append("| case | median ms | GB/s | speedup vs baseline | ideal | note |")
        out.append("|---|---:|---:|---:|---:|---|")
        for r in rows:
            gbs = f"{r.bytes_moved / r.median_s / 1e9:.1f}" if r.bytes_moved else ""
            ratio = f"{base.median_s / r.median_s:.2f}x" if base else ""
            ideal = f"{r.ideal:.2f}x" if r.ideal else ""
            name = f"{r.name} (baseline)" if r.baseline else r.name
            out.append(f"| {name} | {r.median_s * 1e3:.3f} | {gbs} | {ratio} | {ideal} | {r.note} |")
        out.append("")
    return out


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    lines = _tables()
    terminalreporter.write_sep("=", "dpvr-kernels: speed against baselines (medians)")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("DPVR_BENCH_OUT")
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
