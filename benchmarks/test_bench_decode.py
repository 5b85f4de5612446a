"""Decode throughput: new tokens per second after the prefill, DPVR-LF vs stock, per cache and compile setting.

Settings, each one group with stock (the baseline) and DPVR-LF on the same weights:
``dynamic-eager`` (HF's default ``DynamicCache``), ``static-eager`` (``StaticCache`` / ``DPVRStaticCache``, sized
as ``generate(cache_implementation="static")`` sizes it) and ``static-compiled`` (the same, each step through
``torch.compile(model, fullgraph=True)``; on CUDA ``mode="reduce-overhead"``, i.e. CUDA graphs, as HF's
compiled generation does). The timed region is ``DECODE_STEPS`` greedy steps over a cache from an untimed
prefill (pytest-benchmark's ``setup``), so prefill savings do not leak into the decode figure.

The ideal ratio is the cost model's bytes read per step (weights once + the KV cache: decode is memory bound),
summed over the timed steps; DPVR-LF reads the same weights and skips the image tokens' KV in the text-only
layers, so the ideal is near 1 at B=1 and grows with the batch. Each row's note has new tokens/s and the
cache's bytes after the prefill (asserted equal to the cost model's prediction; a static cache also holds the
slots of the new tokens). Compiling does not fit a smoke run (``DPVR_BENCH_QUICK=1``): the compiled setting
is skipped there.
"""

from __future__ import annotations

import pytest
import torch
from shapes import CONFIG, CUDA, DECODE_BATCHES, DECODE_STEPS, DEVICE, DTYPE, DTYPE_NAME, TEXT_TOKENS
from timing import QUICK, measure, median_s

import dpvr_kernels
from dpvr_kernels.config import default_route_layer
from dpvr_kernels.flops import cost_model
from dpvr_kernels.workloads import decode, prefill, set_dpvr, static_cache, synthetic_batch

SETTINGS = ["dynamic-eager", "static-eager", "static-compiled"]
_COMPILED: dict[str, object] = {}


def _ideal_bytes(rep) -> float:
    """Ratio of bytes read over the timed steps (stock / DPVR): step i reads a cache of prompt + i + 1 tokens."""
    steps = [rep.decode_bytes_per_step(rep.prompt_len + 1 + i) for i in range(DECODE_STEPS)]
    return sum(s for s, _ in steps) / sum(d for _, d in steps)


def _forward(model, variant: str, setting: str):
    if not setting.endswith("compiled"):
        return model
    if variant not in _COMPILED:  # one compiled callable per variant: stock and DPVR-LF trace differently
        torch._dynamo.reset()
        _COMPILED.clear()
        _COMPILED[variant] = torch.compile(model, fullgraph=True, mode="reduce-overhead" if CUDA else "default")
    return _COMPILED[variant]


# Stock and DPVR-LF of one setting and batch run back to back (the last decorator is the outermost loop), so a
# busy machine perturbs both alike.
@pytest.mark.parametrize("variant", ["stock", "dpvr"])
@pytest.mark.parametrize("batch_size", DECODE_BATCHES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_decode(benchmark, record, llava_model, batch_size, variant, setting):
    if QUICK and setting.endswith("compiled"):
        pytest.skip("DPVR_BENCH_QUICK=1 smoke run: compiling the model does not fit it")
    model = llava_model
    set_dpvr(model, variant == "dpvr", backend="auto")
    batch = synthetic_batch(CONFIG, batch_size, TEXT_TOKENS, device=DEVICE, dtype=DTYPE)
    static = setting.startswith("static")
    forward = _forward(model, variant, setting)
    kv = {}

    def setup():
        with torch.no_grad():
            tokens, cache = prefill(model, batch, cache=static_cache(model, batch, DECODE_STEPS) if static else None)
        kv["bytes"] = dpvr_kernels.kv_cache_bytes(cache)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return (tokens, cache), {}

    def run(tokens, cache):
        with torch.no_grad():
            return decode(model, batch, tokens, cache, DECODE_STEPS, forward=forward)

    # The compiled setting's warm-up rounds compile (and record CUDA graphs); they are not timed.
    measure(benchmark, run, setup=setup, rounds=3, warmup=2 if setting.endswith("compiled") else 1)
    r = default_route_layer(CONFIG.text_config.num_hidden_layers)
    rep = cost_model(CONFIG, batch.image_tokens, TEXT_TOKENS, batch=batch_size, route_layer=r,
                     dtype_bytes=torch.finfo(DTYPE).bits // 8)
    # A static cache has the room for the new tokens from the start: as many more text tokens.
    sized = cost_model(CONFIG, batch.image_tokens, TEXT_TOKENS + (DECODE_STEPS if static else 0), batch=batch_size,
                       route_layer=r, dtype_bytes=torch.finfo(DTYPE).bits // 8)
    assert kv["bytes"] == (sized.kv_bytes_dpvr if variant == "dpvr" else sized.kv_bytes_stock)
    median = median_s(benchmark)
    tps = batch_size * DECODE_STEPS / median if median else 0.0
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if CUDA else ""
    kv_note = f"prompt KV{' (static)' if static else ''} {kv['bytes'] / 2**20:.1f} MiB"
    if variant == "dpvr":
        kv_note += f" ({kv['bytes'] / sized.kv_bytes_stock:.2f}x of stock)"
    benchmark.extra_info.update(kv_bytes=kv["bytes"], new_tokens_per_s=tps)
    group = (f"decode {DECODE_STEPS} steps B={batch_size} {setting}, prompt {batch.image_tokens} img + "
             f"{TEXT_TOKENS} txt, {DTYPE_NAME}")
    record(benchmark, group=group, name=variant, baseline=variant == "stock",
           ideal=_ideal_bytes(rep) if variant == "dpvr" else None, note=f"{tps:.1f} new tok/s, {kv_note}{peak}")
