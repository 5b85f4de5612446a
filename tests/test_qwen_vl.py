"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and GLM-4V under DPVR-LF: M-RoPE positions (3 rows from the model's own
``get_rope_index``, compressed after each image, continued from ``rope_deltas`` in decode steps; interleaved in
Qwen3-VL) gathered per token into the text stream and the side branch, and Qwen3-VL's deepstack features added
after the first layers. Logits against the per-sample reference with left and right padding, images of different
sizes and a video in one batch; greedy ``generate`` (dynamic and static cache) against the reference loop;
save/load; side-branch gradients; unpatch; a route layer below the deepstack layers refused."""

from __future__ import annotations

import pytest
import torch
from qwen_models import CLASSES, DEEPSTACK, IMAGE, LAYOUTS, QWEN3, VIDEO, layouts, qwen_batch, tiny_qwen
from tiny import check_save_load_round_trip, rel_err

import dpvr_kernels
from dpvr_kernels.reference import reference_forward


def _model_kwargs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "input_ids"}


def _reference(model, batch: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return reference_forward(model, batch["input_ids"], **_model_kwargs(batch), **kw)


@pytest.mark.parametrize("left_pad", [True, False])
@pytest.mark.parametrize("name, video", [(n, False) for n in CLASSES] + [("glm4v", True)])
def test_logits_equal_reference(name, video, left_pad):
    model = dpvr_kernels.patch(tiny_qwen(name), route_layer=2)
    batch = qwen_batch(model, layouts(name, video), seed=1, left_pad=left_pad)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    ref = _reference(model, batch)
    assert rel_err(logits, ref, batch["attention_mask"]) < 1e-5
    # The check has teeth: 1-D positions (what a LLaVA decoder would get) give other logits, and so does stock.
    one_d = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert rel_err(_reference(model, batch, position_ids=one_d), ref, batch["attention_mask"]) > 1e-3
    with torch.no_grad():
        stock = dpvr_kernels.unpatch(model)(**batch, use_cache=False).logits
    assert rel_err(stock, ref, batch["attention_mask"]) > 1e-3


def _reference_loop(model, batch: dict, steps: int) -> torch.Tensor:
    """Greedy decoding with the reference, recomputing every position from scratch (``get_rope_index`` over
    the prompt and the tokens so far, as stock does at a prefill), generated tokens as text."""
    batch = dict(batch)
    ids = batch.pop("input_ids")
    vision = (ids == IMAGE) | (ids == VIDEO)
    for _ in range(steps):
        with torch.no_grad():
            logits = reference_forward(model, ids, vision_mask=vision, **batch)[:, -1]
        logits[:, [IMAGE, VIDEO]] = -float("inf")
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
        vision = torch.cat([vision, torch.zeros_like(nxt, dtype=torch.bool)], 1)
    return ids


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", CLASSES)
def test_greedy_generate_equals_reference_loop(name, cache):
    model = dpvr_kernels.patch(tiny_qwen(name, seed=3), route_layer=DEEPSTACK if name in QWEN3 else 1)
    batch = qwen_batch(model, layouts(name), seed=4)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, **kw)
    assert torch.equal(out, _reference_loop(model, batch, 5))


@pytest.mark.parametrize("name", CLASSES)
def test_save_load_round_trip(name, tmp_path):
    model = dpvr_kernels.patch(tiny_qwen(name, seed=5), route_layer=3)
    check_save_load_round_trip(model, qwen_batch(model, layouts(name), seed=6), tmp_path)


@pytest.mark.parametrize("name", CLASSES)
def test_side_branch_gradients_equal_reference(name):
    model = dpvr_kernels.patch(tiny_qwen(name, seed=7), route_layer=2)
    dpvr_kernels.mark_trainable(model)
    batch = qwen_batch(model, layouts(name)[:2], seed=8)
    side = list(model.model.language_model.dpvr_side_branch.parameters())
    keep = batch["attention_mask"].bool()
    model(**batch, use_cache=False).logits[keep].square().mean().backward()
    fast = [p.grad.clone() for p in side]
    model.zero_grad()
    reference_forward(model, batch["input_ids"], **_model_kwargs(batch))[keep].square().mean().backward()
    for a, b in zip(fast, (p.grad for p in side), strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", CLASSES)
def test_unpatch_is_bit_exact(name):
    stock = tiny_qwen(name, seed=9)
    batch = qwen_batch(stock, layouts(name), seed=10)
    with torch.no_grad():
        before = stock(**batch, use_cache=False).logits
        model = dpvr_kernels.unpatch(dpvr_kernels.patch(stock, route_layer=2))
        assert torch.equal(model(**batch, use_cache=False).logits, before)


@pytest.mark.parametrize("name", QWEN3)
def test_deepstack_is_added_before_the_route(name):
    """The deepstack features reach the vision tokens (the logits change when they are dropped), and a route layer
    that the injections would cross is refused with the fix."""
    model = dpvr_kernels.patch(tiny_qwen(name, seed=11), route_layer=DEEPSTACK)
    batch = qwen_batch(model, LAYOUTS[:1], seed=12)
    inner = model.model.language_model
    with torch.no_grad():
        with_features = model(**batch, use_cache=False).logits
        handle = inner.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "deepstack_visual_embeds": None}),
                                                 with_kwargs=True)
        try:
            without = model(**batch, use_cache=False).logits
        finally:
            handle.remove()
    assert (with_features - without).abs().max() > 1e-4
    with pytest.raises(ValueError, match=f"route_layer >= {DEEPSTACK}"):
        dpvr_kernels.patch(tiny_qwen(name), route_layer=DEEPSTACK - 1)


@pytest.mark.parametrize("name, backend", [("qwen2_5_vl", "inductor")]
                         + [(n, "eager") for n in CLASSES if n != "qwen2_5_vl"])
def test_hf_compiled_generation_with_static_cache(name, backend):
    """transformers' compiled decode (compile_config + static cache, set up on the model's generation_config as
    the transformers docs do), with M-RoPE positions continued from ``rope_deltas``: the same tokens as eager,
    one graph for every decode step (fullgraph: no graph break). Inductor on Qwen2.5-VL; Dynamo with the eager
    backend (the same graph capture, no code generation) on the other classes."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = dpvr_kernels.patch(tiny_qwen(name, seed=13), route_layer=2)
    batch = qwen_batch(model, layouts(name), seed=14)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None, backend=backend)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model.generate(**batch, max_new_tokens=6, do_sample=False)
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = config
        compiled = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_rows_equal_separate_sequences(name):
    """Padding-free packing as training collators do it for M-RoPE: one row of two sequences, positions as
    ``[4, 1, L]`` (1-D text positions first, then each sequence's own M-RoPE rows, restarting at 0) and the
    flash-attn style ``cu_seq_lens_q`` that names the boundaries. Each sequence's logits equal the sequence run
    alone."""
    model = dpvr_kernels.patch(tiny_qwen(name, seed=15), route_layer=2)
    seqs = [qwen_batch(model, [["T", "I", "T", "T"]], seed=16), qwen_batch(model, [["T", "T", "I", "T", "I"]], seed=17)]
    alone, rows, text_rows = [], [], []
    for batch in seqs:
        with torch.no_grad():
            alone.append(model(**batch, use_cache=False).logits[0])
        rope, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"])
        rows.append(rope[:, 0])
        text_rows.append(torch.arange(batch["input_ids"].shape[1]))
    lengths = [b["input_ids"].shape[1] for b in seqs]
    packed = {
        "input_ids": torch.cat([b["input_ids"] for b in seqs], 1),
        "mm_token_type_ids": torch.cat([b["mm_token_type_ids"] for b in seqs], 1),
        "pixel_values": torch.cat([b["pixel_values"] for b in seqs]),
        "image_grid_thw": torch.cat([b["image_grid_thw"] for b in seqs]),
        "position_ids": torch.cat([torch.cat(text_rows)[None], torch.cat(rows, 1)])[:, None],
        "cu_seq_lens_q": torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
    }
    packed["cu_seq_lens_k"], packed["max_length_q"] = packed["cu_seq_lens_q"], max(lengths)
    packed["max_length_k"] = max(lengths)
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits[0]
    want = torch.cat(alone)
    assert ((logits - want).abs().max() / want.abs().max()).item() < 1e-5
    # Teeth: the same row read as one sequence (no cu_seq_lens, a text row that does not restart) differs.
    one = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_length"))}
    one["position_ids"] = one["position_ids"].clone()
    one["position_ids"][0, 0] = torch.arange(sum(lengths))
    with torch.no_grad():
        joined = model(**one, use_cache=False).logits[0]
    assert ((joined - want).abs().max() / want.abs().max()).item() > 1e-3


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_cost_model_prices_the_decoder(name):
    """``cost_model(config.text_config, ...)`` (the decoder, which DPVR-LF changes; these towers are not
    modelled): exact parameter counts of the decoder and the side branch, and the KV bytes of a real cache."""
    from dpvr_kernels.models.backbone import CACHE_KW, side_branch

    model = dpvr_kernels.patch(tiny_qwen(name, seed=18), route_layer=2)
    batch = qwen_batch(model, [["T", "I", "T", "T", "I", "T"]], seed=19)  # one sample: no padding
    vision = int(((batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)).sum())
    text = batch["input_ids"].shape[1] - vision
    report = dpvr_kernels.cost_model(model.config.text_config, image_tokens=vision, text_tokens=text, route_layer=2,
                                     dtype_bytes=4)
    lm = model.model.language_model
    side = sum(p.numel() for p in side_branch(model).parameters())
    decoder = sum(p.numel() for p in lm.parameters()) - side
    tied = model.lm_head.weight is lm.embed_tokens.weight
    assert report.params_total == decoder + (0 if tied else model.lm_head.weight.numel())
    assert report.params_side_branch == side
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    assert dpvr_kernels.kv_cache_bytes(getattr(out, CACHE_KW)) == report.kv_bytes_dpvr < report.kv_bytes_stock


def test_compiled_generation_reuses_the_cache_without_recompiling():
    """Qwen2.5-VL: a later compiled static-cache call with fewer new tokens, or a shorter prompt, reuses the cache
    and the compiled decode step (M-RoPE decode positions come from ``rope_deltas``, tensors): eager's tokens."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from dpvr_kernels.models.backbone import CACHE_KW

    model = dpvr_kernels.patch(tiny_qwen("qwen2_5_vl", seed=22), route_layer=2)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None)
    config._compile_all_devices = True
    long_prompt = qwen_batch(model, LAYOUTS, seed=23)
    short_prompt = qwen_batch(model, [["T", "I", "T"], ["T", "V", "T"], ["T", "T"], ["T", "I", "V"]], seed=24)
    torch._dynamo.reset()
    counters.clear()
    caches = []
    for batch, new in [(long_prompt, 6), (long_prompt, 3), (short_prompt, 6)]:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new, do_sample=False, cache_implementation="static",
                                 compile_config=config, return_dict_in_generate=True)
            eager = model.generate(**batch, max_new_tokens=new, do_sample=False)
        assert torch.equal(out.sequences, eager)
        caches.append(getattr(out, CACHE_KW))
    assert caches[0] is caches[1] is caches[2]
    assert counters["stats"]["unique_graphs"] == 1
