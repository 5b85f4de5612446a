"""End-to-end prefill: DPVR-LF (patched) vs stock HF LLaVA vs the per-sample reference, same weights.

Shapes per device are in ``shapes.py`` (CUDA: LLaVA-1.5-7B, bf16, batch 1 and 8; CPU: a scaled-down
LLaVA-1.5, fp32, batch 4). The ideal speedup is the FLOP ratio from ``dpvr_kernels.cost_model``.
``test_prefill_compiled``: the same forward through ``torch.compile(model)``, stock compiled as the baseline
(the one host sync of the route plan is a graph break by design; compilation is in the untimed warm-up).
"""

from __future__ import annotations

import pytest
import torch
from shapes import CONFIG, CUDA, DEVICE, DTYPE_NAME, PREFILL_BATCHES, TEXT_TOKENS
from timing import QUICK, measure

from dpvr_kernels.config import default_route_layer
from dpvr_kernels.flops import cost_model
from dpvr_kernels.reference import reference_forward
from dpvr_kernels.vision_tokens import tokens_per_image
from dpvr_kernels.workloads import set_dpvr, synthetic_batch


def _ideal(batch_size: int) -> float:
    r = default_route_layer(CONFIG.text_config.num_hidden_layers)
    rep = cost_model(CONFIG, tokens_per_image(CONFIG), TEXT_TOKENS, batch=batch_size, route_layer=r)
    return rep.ideal_prefill_speedup


@pytest.mark.parametrize("variant", ["stock", "dpvr", "dpvr_torch_kernels", "reference"])
@pytest.mark.parametrize("batch_size", PREFILL_BATCHES)
def test_prefill(benchmark, record, llava_model, batch_size, variant):
    """``dpvr``: the fast path (auto kernels); ``dpvr_torch_kernels``: the same forward with plain torch
    indexing for route/merge (a plain-torch packed forward); ``reference``: per-sample loops."""
    if variant == "reference" and CUDA and batch_size > 1:
        pytest.skip("the per-sample reference is a CPU oracle; one GPU batch size is enough")
    model = llava_model
    batch = synthetic_batch(CONFIG, batch_size, TEXT_TOKENS, device=DEVICE, dtype=model.dtype)
    set_dpvr(model, variant != "stock", backend="torch" if variant == "dpvr_torch_kernels" else "auto")
    if variant == "reference":
        def fn():
            return reference_forward(model, batch.input_ids, batch.pixel_values, batch.attention_mask)
    else:
        def fn():
            return model(**batch.as_kwargs(), use_cache=False)  # all logits, as cost_model counts
    with torch.no_grad():
        measure(benchmark, fn, rounds=5, warmup=1)
    group = (f"prefill B={batch_size} {batch.image_tokens} img + {TEXT_TOKENS} txt, "
             f"{CONFIG.text_config.num_hidden_layers} layers x {CONFIG.text_config.hidden_size}, {DTYPE_NAME}")
    record(benchmark, group=group, name=variant, baseline=variant == "stock",
           ideal=_ideal(batch_size) if variant.startswith("dpvr") else None)


@pytest.mark.parametrize("variant", ["stock", "dpvr"])
@pytest.mark.parametrize("batch_size", PREFILL_BATCHES)
def test_prefill_compiled(benchmark, record, llava_model, batch_size, variant):
    if QUICK:
        pytest.skip("DPVR_BENCH_QUICK=1 smoke run: compiling the model does not fit it")
    model = llava_model
    batch = synthetic_batch(CONFIG, batch_size, TEXT_TOKENS, device=DEVICE, dtype=model.dtype)
    set_dpvr(model, variant == "dpvr", backend="auto")
    torch._dynamo.reset()  # stock and DPVR-LF share the weights but not their graphs
    compiled = torch.compile(model)

    def fn():
        return compiled(**batch.as_kwargs(), use_cache=False)

    with torch.no_grad():
        measure(benchmark, fn, rounds=5, warmup=2)
    torch._dynamo.reset()
    group = (f"prefill compiled B={batch_size} {batch.image_tokens} img + {TEXT_TOKENS} txt, "
             f"{CONFIG.text_config.num_hidden_layers} layers x {CONFIG.text_config.hidden_size}, {DTYPE_NAME}")
    record(benchmark, group=group, name=variant, baseline=variant == "stock",
           ideal=_ideal(batch_size) if variant == "dpvr" else None)
