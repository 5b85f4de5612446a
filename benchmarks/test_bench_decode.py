"""Decode throughput: new tokens per second after the prefill, DPVR-LF vs stock, and KV-cache bytes.

The timed region is ``DECODE_STEPS`` greedy decode steps over a cache from an untimed prefill
(pytest-benchmark's ``setup``), so prefill savings do not leak into the decode figure. The ideal ratio is
cost_model's per-token FLOP ratio at the prompt length (decode is dominated by the linear layers, which
DPVR does not shrink; its gain is attention and KV bytes). Each row's note has the live prompt cache's
bytes (asserted equal to the cost model's prediction) and, for DPVR, their ratio to stock.
"""

from __future__ import annotations

import pytest
import torch
from shapes import CONFIG, CUDA, DECODE_BATCHES, DECODE_STEPS, DEVICE, DTYPE, DTYPE_NAME, TEXT_TOKENS
from timing import measure, median_s

import dpvr_kernels
from dpvr_kernels.config import default_route_layer
from dpvr_kernels.flops import cost_model
from dpvr_kernels.workloads import decode, prefill, set_dpvr, synthetic_batch


@pytest.mark.parametrize("batch_size", DECODE_BATCHES)
@pytest.mark.parametrize("variant", ["stock", "dpvr"])
def test_decode(benchmark, record, llava_model, batch_size, variant):
    model = llava_model
    set_dpvr(model, variant == "dpvr", backend="auto")
    batch = synthetic_batch(CONFIG, batch_size, TEXT_TOKENS, device=DEVICE, dtype=DTYPE)
    kv = {}

    def setup():
        with torch.no_grad():
            tokens, cache = prefill(model, batch)
        kv["bytes"] = dpvr_kernels.kv_cache_bytes(cache)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return (tokens, cache), {}

    def run(tokens, cache):
        with torch.no_grad():
            return decode(model, batch, tokens, cache, DECODE_STEPS)

    measure(benchmark, run, setup=setup, rounds=3, warmup=1)
    r = default_route_layer(CONFIG.text_config.num_hidden_layers)
    rep = cost_model(CONFIG, batch.image_tokens, TEXT_TOKENS, batch=batch_size, route_layer=r,
                     dtype_bytes=torch.finfo(DTYPE).bits // 8)
    expected = rep.kv_bytes_dpvr if variant == "dpvr" else rep.kv_bytes_stock
    assert kv["bytes"] == expected  # the live cache is what the cost model predicts
    median = median_s(benchmark)
    tps = batch_size * DECODE_STEPS / median if median else 0.0
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if CUDA else ""
    kv_note = f"prompt KV {kv['bytes'] / 2**20:.1f} MiB"
    if variant == "dpvr":
        kv_note += f" ({kv['bytes'] / rep.kv_bytes_stock:.2f}x of stock)"
    benchmark.extra_info.update(kv_bytes=kv["bytes"], new_tokens_per_s=tps)
    group = (f"decode {DECODE_STEPS} steps B={batch_size}, prompt {batch.image_tokens} img + {TEXT_TOKENS} txt, "
             f"{DTYPE_NAME}")
    record(benchmark, group=group, name=variant, baseline=variant == "stock",
           ideal=rep.ideal_decode_speedup if variant == "dpvr" else None,
           note=f"{tps:.1f} new tok/s, {kv_note}{peak}")
