"""generate() under DPVR-LF: the text-only deep cache against a loop over the reference forward."""

from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN, make_batch, tiny_llava
from transformers import DynamicCache

import dpvr_kernels
from dpvr_kernels.models.backbone import CACHE_KW
from dpvr_kernels.reference import reference_forward

PROMPTS = [["T", "I", "T", "T"], ["T", "T", "I", "T", "T", "T", "T"], ["T", "T", "T"]]  # one without image
NEW_TOKENS = 16


def reference_loop(model, ids, mask, pv, steps, suppress=(IMAGE_TOKEN,), bias=None):
    """Re-run the full reference forward (no cache) for every new token, greedy.

    ``suppress`` as generation_config.suppress_tokens, ``bias`` {token: added logit} as sequence_bias. Only the
    prompt's image tokens are vision tokens: a generated image-token id is text, as stock embeds it.
    """
    cur, cur_mask, step_logits = ids, mask, []
    vision = (ids == IMAGE_TOKEN) & (pv is not None)
    for _ in range(steps):
        pos = (cur_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = reference_forward(model, cur, pv, cur_mask, position_ids=pos, vision_mask=vision)[:, -1]
        step_logits.append(logits.clone())
        for token in suppress:
            logits[:, token] = -float("inf")
        for token, value in (bias or {}).items():
            logits[:, token] += value
        nxt = logits.argmax(-1, keepdim=True)
        cur = torch.cat([cur, nxt], 1)
        cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], 1)
        vision = torch.cat([vision, torch.zeros_like(nxt, dtype=torch.bool)], 1)
    return cur, torch.stack(step_logits, 1)


@pytest.mark.parametrize("route_layer", [0, 3, 4])
def test_greedy_equals_reference_loop(route_layer):
    model = dpvr_kernels.patch(tiny_llava(), route_layer=route_layer)
    ids, mask, pv = make_batch(PROMPTS, seed=route_layer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_tokens, ref_logits = reference_loop(model, ids, mask, pv, NEW_TOKENS)
    assert out.sequences.shape == (3, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out.sequences, ref_tokens)
    logits = torch.stack(out.logits, 1)
    err = ((logits - ref_logits).abs().amax() / ref_logits.abs().amax()).item()
    assert err < 1e-5


def test_use_cache_false_agrees():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch(PROMPTS, seed=5)
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(model.generate(**kw, use_cache=True), model.generate(**kw, use_cache=False))


def test_sampling_with_seed_matches_reference():
    # Sampling draws from the same distribution in the same order: with logits agreeing to 1e-5 the
    # seeded multinomial picks the same tokens (a temperature keeps the distribution broad).
    model = dpvr_kernels.patch(tiny_llava(), route_layer=3)
    ids, mask, pv = make_batch(PROMPTS[:2], seed=3)
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=8, do_sample=True,
                             top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(1234)
    cur, cur_mask = ids, mask
    for _ in range(8):
        pos = (cur_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = reference_forward(model, cur, pv, cur_mask, position_ids=pos)[:, -1]
        logits[:, IMAGE_TOKEN] = -float("inf")
        nxt = torch.multinomial(logits.softmax(-1), 1)
        cur = torch.cat([cur, nxt], 1)
        cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, cur)


def test_deep_layers_cache_text_only_and_bytes_match_cost_model():
    model = dpvr_kernels.patch(tiny_llava(kv_heads=2), route_layer=2)
    ids, mask, pv = make_batch([["T", "T", "I", "T", "T", "T", "I", "T"]])  # 6 text + 8 image tokens
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
    cache = getattr(out, CACHE_KW)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [14, 14, 6, 6, 6, 14]  # layers [0,2) and the fusion layer hold all, [2,5) text only
    report = dpvr_kernels.cost_model(model.config, image_tokens=8, text_tokens=6, route_layer=2, dtype_bytes=4)
    assert dpvr_kernels.kv_cache_bytes(cache) == report.kv_bytes_dpvr
    model_stock = tiny_llava(kv_heads=2)
    with torch.no_grad():
        stock_cache = model_stock(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
    stock_cache = getattr(stock_cache, CACHE_KW)
    assert dpvr_kernels.kv_cache_bytes(stock_cache) == report.kv_bytes_stock


def test_images_in_a_decode_step_are_an_error():
    # pixel_values with a cache that already holds the prompt: the images cannot join the text-only deep cache.
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch([["T", "I", "T"]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
        cache = getattr(out, CACHE_KW)
        step, _, pv2 = make_batch([["I"]])
        with pytest.raises(ValueError, match="images in a decode step.*drop pixel_values"):
            model(input_ids=step, pixel_values=pv2, attention_mask=torch.ones(1, ids.shape[1] + 4, dtype=torch.long),
                  **{CACHE_KW: cache})


def test_stock_cache_is_refused():
    stock = tiny_llava()
    ids, mask, pv = make_batch([["T", "I", "T"]])
    with torch.no_grad():
        out = stock(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
    cache = getattr(out, CACHE_KW)
    dpvr_kernels.patch(stock, route_layer=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="not filled by a DPVR-LF prefill"):
        stock(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long),
              **{CACHE_KW: cache})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_beams": 2}, "beam search"),
        ({"cache_implementation": "offloaded"}, "cache_implementation='static'"),
        ({"prompt_lookup_num_tokens": 3}, "assisted decoding"),
    ],
)
def test_unsupported_decoding_modes_refused(kw, match):
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch([["T", "I", "T"]])
    with pytest.raises(NotImplementedError, match=match):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=2, **kw)


def test_explicit_dynamic_cache_allowed():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch(PROMPTS, seed=9)
    with torch.no_grad():
        a = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=4, do_sample=False)
        b = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=4, do_sample=False,
                           **{CACHE_KW: DynamicCache(config=model.config.text_config)})
    assert torch.equal(a, b)
