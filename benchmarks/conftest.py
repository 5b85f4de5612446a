"""Shared reporting for the benchmark suites: every figure next to its baseline from the same run.

A benchmark times with ``timing.measure(benchmark, fn, rounds=..., warmup=...)`` (on CUDA the device-event
median is what gets reported), then calls ``record(benchmark, group=..., name=..., baseline=..., bytes_moved=..., ideal=..., ceiling=...)``;
one that times several cases in turn with ``timing.measure_paired`` records each with ``case=`` its key.
One table per group is printed at the end with the median, GB/s (when bytes are given), the fraction of
the group's ``ceiling`` row (a plain device copy) bandwidth, the speedup against the group's baseline and,
where the cost model gives one, the ideal speedup and the fraction of it reached.

``DPVR_BENCH_OUT=path.md`` writes the tables as markdown and ``DPVR_BENCH_JSON=path.json`` the same rows as
JSON; both are rewritten after every recorded row, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass

import pytest
import torch
from shapes import CONFIG, DEVICE, DTYPE
from timing import QUICK, median_s

# The vLLM serving benchmark runs in the vLLM environment only (make vllm-bench sets DPVR_VLLM_TESTS).
collect_ignore = [] if os.environ.get("DPVR_VLLM_TESTS") else ["test_bench_vllm_serving.py"]


@dataclass
class Row:
    group: str
    name: str
    median_s: float
    timer: str  # "cuda events" or "host clock"
    baseline: bool
    ceiling: bool
    bytes_moved: int | None
    ideal: float | None
    note: str


_ROWS: list[Row] = []


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


@pytest.fixture
def record():
    def _record(benchmark, group: str, name: str, baseline: bool = False, ceiling: bool = False,
                bytes_moved: int | None = None, ideal: float | None = None, note: str = "",
                case: str | None = None) -> None:
        median = median_s(benchmark, case)
        if median is None:  # --benchmark-disable: nothing was timed
            return
        if case is not None:
            timer = "host clock, paired rounds"
        else:
            timer = "cuda events" if "cuda_event_median_s" in benchmark.extra_info else "host clock"
        _ROWS.append(Row(group, name, median, timer, baseline, ceiling, bytes_moved, ideal, note))
        _write_outputs()

    return _record


@pytest.fixture(scope="session")
def llava_model():
    """The end-to-end benchmarks' model (shapes.CONFIG, random weights, sdpa), built once per session and
    switched between stock and DPVR-LF with ``set_dpvr`` (7B weights exist once on the GPU)."""
    import dpvr_kernels
    from dpvr_kernels.workloads import build_model

    model = build_model(CONFIG, dtype=DTYPE, device=DEVICE, attn="sdpa")
    yield model
    if dpvr_kernels.is_patched(model):
        dpvr_kernels.unpatch(model)


def _derived(rows: list[Row]) -> list[dict]:
    """Each row as a dict with its ratios to the group's baseline, ceiling and ideal."""
    base = next((r for r in rows if r.baseline), None)
    ceil = next((r for r in rows if r.ceiling and r.bytes_moved), None)
    out = []
    for r in rows:
        d = asdict(r)
        d["median_ms"] = r.median_s * 1e3
        d["gb_per_s"] = r.bytes_moved / r.median_s / 1e9 if r.bytes_moved else None
        d["fraction_of_ceiling"] = (d["gb_per_s"] / (ceil.bytes_moved / ceil.median_s / 1e9)
                                    if ceil and r.bytes_moved else None)
        d["speedup_vs_baseline"] = base.median_s / r.median_s if base else None
        d["fraction_of_ideal"] = (d["speedup_vs_baseline"] / r.ideal
                                  if r.ideal and d["speedup_vs_baseline"] else None)
        out.append(d)
    return out


def _groups() -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for group in dict.fromkeys(r.group for r in _ROWS):
        groups[group] = _derived([r for r in _ROWS if r.group == group])
    return groups


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _tables() -> list[str]:
    out = [f"Machine: {machine()}" + (" -- QUICK smoke run: one round, figures meaningless" if QUICK else ""), ""]
    for group, rows in _groups().items():
        out.append(f"### {group}")
        out.append("| case | median ms | GB/s | of copy | speedup vs baseline | ideal | of ideal | timer | note |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---|---|")
        for d in rows:
            name = d["name"] + (" (baseline)" if d["baseline"] else "") + (" (ceiling)" if d["ceiling"] else "")
            out.append(
                f"| {name} | {d['median_ms']:.3f} | {_fmt(d['gb_per_s'], '.1f')} "
                f"| {_fmt(d['fraction_of_ceiling'] and 100 * d['fraction_of_ceiling'], '.0f', '%')} "
                f"| {_fmt(d['speedup_vs_baseline'], '.2f', 'x')} | {_fmt(d['ideal'], '.2f', 'x')} "
                f"| {_fmt(d['fraction_of_ideal'] and 100 * d['fraction_of_ideal'], '.0f', '%')} "
                f"| {d['timer']} | {d['note']} |"
            )
        out.append("")
    return out


def _write_atomic(path: str, text: str) -> None:
    # A run stopped mid-write must leave the previous complete file, never half a JSON document.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_outputs() -> None:
    path = os.environ.get("DPVR_BENCH_OUT")
    if path:
        _write_atomic(path, "\n".join(_tables()) + "\n")
    path = os.environ.get("DPVR_BENCH_JSON")
    if path:
        _write_atomic(path, json.dumps({"machine": machine(), "quick": QUICK, "groups": _groups()}, indent=1))


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.write_sep("=", "dpvr-kernels: speed against baselines (medians)")
    for line in _tables():
        terminalreporter.write_line(line)
