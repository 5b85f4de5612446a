"""End-to-end prefill: DPVR-LF (patched) vs stock HF LLaVA vs the per-sample reference, same weights.

CPU: a LLaVA-1.5-shaped model scaled down (hidden 1024, 16 layers, 144 image + 32 text tokens, batch 4,
fp32). GPU: LLaVA-1.5-7B shapes (576 image + 64 text tokens) in bf16 at batch 1 and 8. The ideal
speedup is the FLOP ratio from ``dpvr_kernels.cost_model``.
"""

from __future__ import annotations

import pytest
import torch

import dpvr_kernels
from dpvr_kernels.flops import cost_model, named_config, scaled_config
from dpvr_kernels.reference import reference_forward
from dpvr_kernels.workloads import build_model, set_dpvr, synthetic_batch, tokens_per_image

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CONFIG = named_config("llava-1.5-7b") if CUDA else scaled_config()
TEXT = 64 if CUDA else 32
BATCHES = [1, 8] if CUDA else [4]


def _sync(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, dtype=DTYPE, device=DEVICE, attn="sdpa")


def _ideal(batch_size):
    n = CONFIG.text_config.num_hidden_layers
    r = dpvr_kernels.flops.default_route_layer(n)
    per_image = tokens_per_image(CONFIG)
    rep = cost_model(CONFIG, per_image, TEXT, batch=batch_size, route_layer=r)
    return rep.ideal_prefill_speedup


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("variant", ["stock", "dpvr", "dpvr_torch_kernels", "reference"])
def test_prefill(benchmark, record, model, batch_size, variant):
    """``dpvr``: the fast path (auto kernels); ``dpvr_torch_kernels``: the same forward with plain torch
    indexing for route/merge (a plain-torch packed forward); ``reference``: per-sample loops."""
    if variant == "reference" and CUDA and batch_size > 1:
        pytest.skip("the per-sample reference is a CPU oracle; one GPU batch size is enough")
    batch = synthetic_batch(CONFIG, batch_size, TEXT, device=DEVICE, dtype=DTYPE)
    set_dpvr(model, variant != "stock", backend="torch" if variant == "dpvr_torch_kernels" else "auto")
    if variant == "reference":
        fn = _sync(lambda: reference_forward(model, batch.input_ids, batch.pixel_values, batch.attention_mask))
    else:
        fn = _sync(lambda: model(**batch.as_kwargs(), use_cache=False))
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    group = (f"prefill B={batch_size} {batch.image_tokens} img + {TEXT} txt, {CONFIG.text_config.num_hidden_layers} "
             f"layers x {CONFIG.text_config.hidden_size}, {str(DTYPE)[6:]}")
    record(benchmark, group=group, name=variant, baseline=variant == "stock",
           ideal=_ideal(batch_size) if variant.startswith("dpvr") else None)
