"""patch()/unpatch() on tiny random LLaVA models: numerics against the reference forward, API, errors."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import IMAGE_TOKEN, make_batch, rel_err, tiny_llava
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

import dpvr_kernels
from dpvr_kernels.models import classes
from dpvr_kernels.reference import reference_forward

LAYOUTS = {
    "image_middle": [["T", "T", "I", "T", "T"], ["T", "I", "T"], ["T", "T", "T", "I", "T", "T", "T"]],
    "image_first_and_last": [["I", "T", "T", "T"], ["T", "T", "T", "I"], ["I", "T"]],
    "two_images_one_sample": [["T", "I", "T", "I", "T"], ["T", "T", "I", "T"]],
    "sample_without_image": [["T", "T", "T", "T", "T"], ["T", "I", "T", "T"]],
    "no_text_after_image": [["T", "T", "I"], ["I"], ["T", "I", "T"]],
}


def run_both(model, layout, left_pad=True, explicit_positions=True, seed=0, **patch_kw):
    ids, mask, pv = make_batch(layout, seed=seed, left_pad=left_pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) if explicit_positions else None
    dpvr_kernels.patch(model, **patch_kw)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=pos).logits
        ref = reference_forward(model, ids, pv, mask, position_ids=pos)
    return out, ref, mask


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("left_pad", [True, False], ids=["left_pad", "right_pad"])
def test_layouts_match_reference(layout, left_pad):
    out, ref, mask = run_both(tiny_llava(), LAYOUTS[layout], left_pad=left_pad, route_layer=3)
    assert rel_err(out, ref, mask) < 1e-5


@pytest.mark.parametrize("route_layer,fusion_layers", [(0, 1), (3, 1), (4, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_route_layers_and_attention(route_layer, fusion_layers, attn):
    model = tiny_llava(attn=attn)  # 6 layers: route 4 = N-2, route 3 with 2 fusion layers = N-f-1
    out, ref, mask = run_both(model, LAYOUTS["two_images_one_sample"], route_layer=route_layer,
                              fusion_layers=fusion_layers)
    assert rel_err(out, ref, mask) < 1e-5


@pytest.mark.parametrize("backbone,kv_heads", [("llama", 4), ("llama", 1), ("mistral", 2), ("qwen2", 2)])
def test_backbones_and_gqa(backbone, kv_heads):
    out, ref, mask = run_both(tiny_llava(backbone, kv_heads=kv_heads), LAYOUTS["image_middle"])
    assert rel_err(out, ref, mask) < 1e-5


def test_default_positions_and_no_mask():
    ids, _, pv = make_batch([["T", "I", "T", "T"], ["T", "T", "I", "T"]])
    model = dpvr_kernels.patch(tiny_llava())
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv).logits
        ref = reference_forward(model, ids, pv)
    assert rel_err(out, ref, torch.ones_like(ids)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_kernel_backends_agree(backend):
    if backend == "cpu" and not dpvr_kernels.ops._extension.available():
        pytest.fail("compiled extension missing: build with pip install -e . --no-build-isolation")
    out, ref, mask = run_both(tiny_llava(), LAYOUTS["image_middle"], backend=backend)
    assert rel_err(out, ref, mask) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_reference_error(dtype):
    layout = LAYOUTS["two_images_one_sample"]
    ids, mask, pv32 = make_batch(layout)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model32 = dpvr_kernels.patch(tiny_llava(), route_layer=3)
    model_h = dpvr_kernels.patch(tiny_llava(dtype=dtype), route_layer=3)
    pvh = pv32.to(dtype)
    with torch.no_grad():
        truth = reference_forward(model32, ids, pv32, mask, position_ids=pos)
        ref_h = reference_forward(model_h, ids, pvh, mask, position_ids=pos)
        out_h = model_h(input_ids=ids, attention_mask=mask, pixel_values=pvh, position_ids=pos).logits
    ref_err = rel_err(ref_h, truth, mask)
    assert ref_err > 0  # the half-precision reference does make an error
    assert rel_err(out_h, truth, mask) <= 2 * ref_err


def test_unpatched_and_unpatched_again_are_stock_bit_exact():
    ids, mask, pv = make_batch(LAYOUTS["image_middle"])
    model = tiny_llava()
    fresh = tiny_llava()
    with torch.no_grad():
        stock = fresh(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits, stock)
        dpvr_kernels.patch(model, route_layer=2)
        patched = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        assert not torch.allclose(patched, stock)
        dpvr_kernels.unpatch(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits, stock)
    assert not hasattr(model.model.language_model, "dpvr_side_branch")
    assert not hasattr(model.config, "dpvr")
    assert set(model.state_dict()) == set(fresh.state_dict())


def test_side_branch_is_a_registered_module_and_settings_on_config():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    side = model.model.language_model.dpvr_side_branch
    assert any(k.startswith("model.language_model.dpvr_side_branch.") for k in model.state_dict())
    assert model.config.dpvr == {"route_layer": 2, "fusion_layers": 1, "backend": "auto"}
    layer = model.model.language_model.layers[2]
    assert side is not layer
    for (n1, p1), (n2, p2) in zip(side.named_parameters(), layer.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    text = dpvr_kernels.describe(model)
    assert "route_split/fuse_merge" in text and "layers [2, 5): text tokens only, attention 'dpvr_varlen'" in text
    lm = model.model.language_model
    assert [layer.self_attn.config._attn_implementation for layer in lm.layers] == ["sdpa"] * 2 + ["dpvr_varlen"] * 3 + ["sdpa"]
    assert side.self_attn.config._attn_implementation == "dpvr_varlen"


def test_patch_twice():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    side = model.model.language_model.dpvr_side_branch
    assert dpvr_kernels.patch(model, route_layer=2) is model
    assert model.model.language_model.dpvr_side_branch is side
    with pytest.raises(RuntimeError, match="already patched.*unpatch"):
        dpvr_kernels.patch(model, route_layer=3)


def test_save_load_round_trip(tmp_path):
    ids, mask, pv = make_batch(LAYOUTS["two_images_one_sample"])
    model = dpvr_kernels.patch(tiny_llava(), route_layer=3, fusion_layers=2)
    with torch.no_grad():  # a trained side branch differs from layer r: it must not be re-copied on load
        for p in model.model.language_model.dpvr_side_branch.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.dpvr == model.config.dpvr
    dpvr_kernels.patch(loaded)
    assert loaded.config.dpvr["route_layer"] == 3 and loaded.config.dpvr["fusion_layers"] == 2
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"route_layer": 6}, "route_layer"),
        ({"route_layer": -1}, "route_layer"),
        ({"route_layer": 5}, "route_layer"),  # N - f = 5 leaves no text-only layer
        ({"route_layer": 3, "fusion_layers": 3}, "route_layer"),
        ({"fusion_layers": 0}, "fusion_layers"),
        ({"backend": "fast"}, "unknown backend"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        dpvr_kernels.patch(tiny_llava(), **kw)


def test_not_llava():
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        dpvr_kernels.patch(lm)


def test_backbone_without_rotary():
    model = tiny_llava()
    del model.model.language_model.rotary_emb
    with pytest.raises(ValueError, match="rotary"):
        dpvr_kernels.patch(model)


def test_image_token_count_mismatch():
    ids, mask, pv = make_batch(LAYOUTS["image_middle"])
    ids[0, -1] = IMAGE_TOKEN  # one extra image token
    model = dpvr_kernels.patch(tiny_llava())
    with pytest.raises(ValueError, match="image tokens do not match.*per image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)


def test_unpatch_unpatched():
    with pytest.raises(ValueError, match="not patched"):
        dpvr_kernels.unpatch(tiny_llava())


def test_torch_compile_of_the_patched_model():
    # The route ops are custom ops with fake kernels: Dynamo traces them into the graph (the plan's one
    # host sync is a graph break) and Inductor's result matches eager.
    from torch._inductor.compile_fx import compile_fx

    ids, mask, pv = make_batch(LAYOUTS["two_images_one_sample"])
    model = dpvr_kernels.patch(tiny_llava(layers=4), route_layer=1)
    traced = []

    def inductor_recording_ops(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        compiled = torch.compile(model, backend=inductor_recording_ops)
        out = compiled(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert "dpvr.route_split.default" in traced and "dpvr.fuse_merge.default" in traced
    assert rel_err(out, eager, mask) < 1e-5


@pytest.mark.parametrize("name", sorted(classes.REFUSED))
def test_refused_classes_name_the_reason(name):
    """Each refused class exists in the installed transformers under that name, and patch() says why it is
    refused, for the class and a subclass of it (the instance is not initialised: some need timm to build, and
    the class is all the check reads)."""
    import transformers

    cls = getattr(transformers, name)
    for kind in (cls, type("UserSubclass", (cls,), {})):
        with pytest.raises(TypeError, match=re.escape(classes.REFUSED[name][:40])):
            dpvr_kernels.patch(kind.__new__(kind))
