"""Timing for the benchmark suites: pytest-benchmark's ``pedantic``, plus device events on CUDA, and paired rounds
for cases that must share the machine's state (``measure_paired``).

``DPVR_BENCH_QUICK=1`` times one round without warm-up (a smoke run of the suites, as
``scripts/gpu_check.sh --dry-run`` does; its figures are not meaningful).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable

import torch

QUICK = os.environ.get("DPVR_BENCH_QUICK") == "1"


def measure(benchmark, fn: Callable, *, rounds: int, warmup: int, setup: Callable | None = None) -> None:
    """Time ``fn`` with ``benchmark.pedantic`` (``setup`` as there: untimed, returns ``(args, kwargs)``).

    On CUDA each call also records a start and an end event on the current stream and waits for the end
    one, so the device time of the work (not launch latency plus a host sync) is what ``record`` reports.
    """
    if QUICK:
        rounds, warmup = 1, 0
    if not torch.cuda.is_available():
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[float] = []

    def timed(*args, **kwargs):
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        return out

    torch.cuda.synchronize()
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if len(times) > warmup:
        benchmark.extra_info["cuda_event_median_s"] = statistics.median(times[warmup:])


def measure_paired(benchmark, cases: dict[str, Callable], *, rounds: int, warmup: int,
                   setup: Callable | None = None) -> dict[str, list[float]]:
    """Time every function of ``cases`` once per ``benchmark.pedantic`` round, on the same ``setup`` arguments, the
    order turning each round (two cases: AB, BA, AB, ...).

    For comparisons whose effect is smaller than the machine's drift over minutes (a shared VM): each round holds
    one run of every case, seconds apart, so a slow patch of the machine lands on all of them. pytest-benchmark
    times the whole round; each case's own host-clock times (warm-up rounds left out) are returned and kept in
    ``benchmark.extra_info["paired_s"]`` for ``median_s(benchmark, case)`` and pytest-benchmark's JSON. Host clock
    only: for work that returns to the host when done (a serving engine's ``generate``), not for CUDA kernels.
    """
    if QUICK:
        rounds, warmup = 1, 0
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    calls = itertools.count()

    def one_round(*args, **kwargs):
        turn = next(calls)
        for name in names[turn % len(names):] + names[: turn % len(names)]:
            start = time.perf_counter()
            cases[name](*args, **kwargs)
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    kept = {name: t[warmup:] for name, t in times.items()}
    benchmark.extra_info["paired_s"] = kept
    return kept


def median_s(benchmark, case: str | None = None) -> float | None:
    """The median ``measure`` timed: the device-event one on CUDA, else pytest-benchmark's; with ``case``, that
    case's median in a ``measure_paired`` run. None if disabled."""
    if case is not None:
        paired = benchmark.extra_info.get("paired_s", {}).get(case)
        return statistics.median(paired) if paired else None
    event = benchmark.extra_info.get("cuda_event_median_s")
    if event is not None:
        return event
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median
