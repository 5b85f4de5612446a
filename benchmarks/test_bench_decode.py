"""Decode throughput: new tokens per second after the prefill, DPVR-LF vs stock, and KV-cache bytes.

The timed region is ``steps`` greedy decode steps over a cache from an untimed prefill (pytest-benchmark's
``setup``), so prefill savings do not leak into the decode figure. The ideal ratio is cost_model's
per-token FLOP ratio at the prompt length (decode is dominated by the linear layers, which DPVR does not
shrink; its gain is attention and KV bytes).
"""

from __future__ import annotations

import pytest
import torch

import dpvr_kernels
from dpvr_kernels.flops import cost_model, default_route_layer, named_config, scaled_config
from dpvr_kernels.workloads import build_model, decode, prefill, synthetic_batch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CONFIG = named_config("llava-1.5-7b") if CUDA else scaled_config()
TEXT = 64 if CUDA else 32
BATCHES = [1, 32] if CUDA else [1, 16]
STEPS = 32 if CUDA else 8


@pytest.fixture(scope="module")
def model():
    m = build_model(CONFIG, dtype=DTYPE, device=DEVICE, attn="sdpa")
    yield m
    if dpvr_kernels.is_patched(m):
        dpvr_kernels.unpatch(m)


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("variant", ["stock", "dpvr"])
def test_decode(benchmark, record, model, batch_size, variant):
    if variant == "stock" and dpvr_kernels.is_patched(model):
        dpvr_kernels.unpatch(model)
    if variant == "dpvr" and not dpvr_kernels.is_patched(model):
        dpvr_kernels.patch(model)
    batch = synthetic_batch(CONFIG, batch_size, TEXT, device=DEVICE, dtype=DTYPE)
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
            out = decode(model, batch, tokens, cache, STEPS)
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1, iterations=1)
    r = default_route_layer(CONFIG.text_config.num_hidden_layers)
    rep = cost_model(CONFIG, batch.image_tokens, TEXT, batch=batch_size, route_layer=r,
                     dtype_bytes=torch.finfo(DTYPE).bits // 8)
    stats = getattr(benchmark, "stats", None)
    tps = batch_size * STEPS / stats.stats.median if stats else 0.0
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if CUDA else ""
    note = f"{tps:.1f} new tok/s, prompt KV {kv['bytes'] / 2**20:.1f} MiB{peak}"
    group = f"decode {STEPS} steps B={batch_size}, prompt {batch.image_tokens} img + {TEXT} txt, {str(DTYPE)[6:]}"
    record(benchmark, group=group, name=variant, baseline=variant == "stock",
           ideal=rep.ideal_decode_speedup if variant == "dpvr" else None, note=note)
    expected = rep.kv_bytes_dpvr if variant == "dpvr" else rep.kv_bytes_stock
    assert kv["bytes"] == expected  # the live cache is what the cost model predicts
