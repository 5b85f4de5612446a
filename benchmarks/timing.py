"""Timing for the benchmark suites: pytest-benchmark's ``pedantic``, plus device events on CUDA.

``DPVR_BENCH_QUICK=1`` times one round without warm-up (a smoke run of the suites, as
``scripts/gpu_check.sh --dry-run`` does; its figures are not meaningful).
"""

from __future__ import annotations

import os
import statistics
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


def median_s(benchmark) -> float | None:
    """The median ``measure`` timed: the device-event one on CUDA, else pytest-benchmark's; None if disabled."""
    event = benchmark.extra_info.get("cuda_event_median_s")
    if event is not None:
        return event
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median
