"""Sliding-window backbones (Mistral in BakLLaVA, Qwen2 with use_sliding_window): the window is over original
positions in the full layers, the side branch and the text stream (docs/CONTRACT.md rule 6)."""

from __future__ import annotations

import pytest
import torch
from families import IMAGE, family_batch, text_config, tiny_family

import dpvr_kernels
from dpvr_kernels.reference import reference_forward

# ~30 tokens per sample: 2 images of 4 tokens, text around them, left padding in the short sample.
LAYOUTS = [["T"] * 6 + ["I"] + ["T"] * 9 + ["I"] + ["T"] * 8, ["T"] * 4 + ["I"] + ["T"] * 14]


def _model(window: int | None, backbone: str = "mistral", route_layer: int = 2, **kw):
    if backbone == "mistral":
        text = text_config("mistral", sliding_window=window, **kw)
    else:
        text = text_config("qwen2", use_sliding_window=window is not None, sliding_window=window, max_window_layers=2,
                           **kw)
    return dpvr_kernels.patch(tiny_family("llava", seed=11, text=text), route_layer=route_layer)


def _rel(a, b, mask):
    keep = mask.bool()
    return ((a[keep] - b[keep]).abs().max() / b[keep].abs().max()).item()


def test_default_mistral_window_patches_and_costs_nothing():
    # A window longer than any sequence here (Mistral-7B-v0.1's 4096) cannot bind: no refusal, plain causal.
    model = _model(4096)
    batch = family_batch(model, LAYOUTS, seed=1)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        ref = reference_forward(model, **batch)
        unwindowed = reference_forward(_model(None), **batch)
    assert _rel(logits, ref, batch["attention_mask"]) < 1e-5
    assert _rel(ref, unwindowed, batch["attention_mask"]) == 0  # same weights; the window changes nothing
    with torch.no_grad():
        dynamic = model.generate(**batch, max_new_tokens=4, do_sample=False)
        static = model.generate(**batch, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("route_layer", [0, 2, 4])
@pytest.mark.parametrize("backbone", ["mistral", "qwen2"])
def test_binding_window_is_exact_by_original_position(backbone, route_layer):
    model = _model(10, backbone, route_layer)
    batch = family_batch(model, LAYOUTS, seed=2)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        ref = reference_forward(model, **batch)
    assert _rel(logits, ref, batch["attention_mask"]) < 1e-5
    # The window binds here: the reference without it (same weights) is a different function.
    wide = _model(None, backbone, route_layer)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert _rel(reference_forward(wide, **batch), ref, batch["attention_mask"]) > 1e-4


def test_binding_window_with_a_cache_is_a_clear_error():
    model = _model(10)
    batch = family_batch(model, LAYOUTS, seed=3)
    with torch.no_grad(), pytest.raises(ValueError, match="sliding window .* binds.*use_cache=False"):
        model.generate(**batch, max_new_tokens=2, do_sample=False)


def test_window_reached_while_decoding_is_a_clear_error():
    # A prompt of 9 tokens within a window of 12: the prefill is fine, the 4th new token would reach past it.
    model = _model(12)
    batch = family_batch(model, [["T", "T", "I", "T", "T", "T"]], seed=4)
    assert batch["input_ids"].shape[1] == 9 and (batch["input_ids"] == IMAGE).sum() == 4
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)  # 9 + 2 fed back: within the window
        assert out.shape[1] == 12
        with pytest.raises(ValueError, match="sliding window"):
            model.generate(**batch, max_new_tokens=6, do_sample=False)


def test_static_cache_longer_than_the_window_is_refused():
    model = _model(12)
    batch = family_batch(model, [["T", "T", "I", "T", "T", "T"]], seed=5)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="within the window"):
        model.generate(**batch, max_new_tokens=8, do_sample=False, cache_implementation="static")
