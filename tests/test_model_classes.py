"""Every supported LLaVA class under DPVR-LF: logits and greedy generation against the per-sample reference,
save/load, padding sides, images and videos in one batch, and the errors for wrong inputs."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, IMAGE, VIDEO, WITH_VIDEO, family_batch, tiny_family
from tiny import check_save_load_round_trip, rel_err

import dpvr_kernels
from dpvr_kernels.models.backbone import side_branch
from dpvr_kernels.reference import reference_forward

NEW = 5
# Two images in one sample, one image, text around them; video families add a video-only sample and a sample
# with an image and a video.
LAYOUTS = [["T", "T", "I", "T", "I", "T"], ["T", "I", "T", "T", "T"], ["T", "T", "T", "T"]]
VIDEO_LAYOUTS = [["T", "V", "T", "T"], ["T", "I", "T", "V", "T"], ["T", "T", "I", "T"]]


def _layouts(name: str) -> list[list[str]]:
    return VIDEO_LAYOUTS if name in WITH_VIDEO else LAYOUTS


def _vision_kwargs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}


def _reference(model, batch: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return reference_forward(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **_vision_kwargs(batch), **kw)


@pytest.mark.parametrize("left_pad", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_reference(name, left_pad):
    model = dpvr_kernels.patch(tiny_family(name), route_layer=2)
    batch = family_batch(model, _layouts(name), seed=1, left_pad=left_pad)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    ref = _reference(model, batch)
    assert rel_err(logits, ref, batch["attention_mask"]) < 1e-5
    # DPVR-LF is not stock: the reference differs from the unpatched model (the check has teeth)
    with torch.no_grad():
        stock = dpvr_kernels.unpatch(model)(**batch, use_cache=False).logits
    assert rel_err(stock, ref, batch["attention_mask"]) > 1e-3


def _reference_loop(model, batch: dict, steps: int) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vision = (ids == IMAGE) | (ids == VIDEO)  # the prompt's placeholders; generated tokens are text
    vision_kw = _vision_kwargs(batch)
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = reference_forward(model, ids, attention_mask=mask, position_ids=pos, vision_mask=vision,
                                       **vision_kw)[:, -1]
        logits[:, [IMAGE, VIDEO]] = -float("inf")
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        vision = torch.cat([vision, torch.zeros_like(nxt, dtype=torch.bool)], 1)
    return ids


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generate_equals_reference_loop(name):
    model = dpvr_kernels.patch(tiny_family(name, seed=3), route_layer=1)
    batch = family_batch(model, _layouts(name), seed=4)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out, _reference_loop(model, batch, NEW))


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_round_trip(name, tmp_path):
    model = dpvr_kernels.patch(tiny_family(name, seed=5), route_layer=3)
    check_save_load_round_trip(model, family_batch(model, _layouts(name), seed=6), tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_side_branch_gradients_equal_reference(name):
    """Training: the side branch's gradients through the fast path equal those through the per-sample oracle."""
    model = dpvr_kernels.patch(tiny_family(name, seed=7), route_layer=2)
    dpvr_kernels.mark_trainable(model)
    batch = family_batch(model, _layouts(name)[:2], seed=8)
    side = list(side_branch(model).parameters())
    keep = batch["attention_mask"].bool()
    model(**batch, use_cache=False).logits[keep].square().mean().backward()
    fast = [p.grad.clone() for p in side]
    model.zero_grad()
    reference_forward(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                      **_vision_kwargs(batch))[keep].square().mean().backward()
    for a, b in zip(fast, (p.grad for p in side), strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", WITH_VIDEO)
def test_video_tokens_go_to_the_side_branch(name):
    # A video's tokens leave at the route layer like an image's: changing the side branch changes the
    # video-only sample's outputs, and dropping the video (its tokens then are text) changes the routing.
    model = dpvr_kernels.patch(tiny_family(name, seed=7), route_layer=2)
    batch = family_batch(model, [["T", "V", "T", "T"], ["T", "T", "T"]], seed=8)
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits
        for p in model.model.language_model.dpvr_side_branch.parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = model(**batch, use_cache=False).logits
    changed = (before - after).abs().amax(-1)
    assert changed[0].max() > 1e-4  # the video sample
    assert changed[1].max() == 0  # a text-only sample never meets the side branch
    assert rel_err(after, _reference(model, batch), batch["attention_mask"]) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_placeholder_count_names_the_fix(name):
    model = dpvr_kernels.patch(tiny_family(name), route_layer=2)
    batch = family_batch(model, [["T", "I", "T"]], seed=9)
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == IMAGE).nonzero()[0]] = 5  # one image token too few
    batch["input_ids"] = ids
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match="processor inserts them"):
        model(**batch)


def test_video_count_mismatch_names_the_fix():
    model = dpvr_kernels.patch(tiny_family("llava_next_video"), route_layer=2)
    batch = family_batch(model, [["T", "V", "T"]], seed=10)
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, 1), VIDEO)], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    with torch.no_grad(), pytest.raises(ValueError, match="video tokens per video"):
        model(**batch)


def test_unsupported_class_lists_the_supported_ones():
    from families import text_config
    from transformers import LlamaForCausalLM

    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        dpvr_kernels.patch(LlamaForCausalLM(text_config(layers=2)))


@pytest.mark.parametrize("name", WITH_VIDEO)
def test_positional_video_pixels_are_routed(name):
    # model.model(input_ids, pixel_values, ...) with the video pixels by position (their index differs per class)
    # routes the video tokens exactly as the keyword call does.
    import inspect

    model = dpvr_kernels.patch(tiny_family(name, seed=12), route_layer=2)
    batch = family_batch(model, [["T", "V", "T", "T"], ["T", "T", "T"]], seed=13)
    params = list(inspect.signature(type(model.model).forward).parameters)[2:]
    values = {"pixel_values_videos": batch["pixel_values_videos"], "attention_mask": batch["attention_mask"]}
    last = max(params.index(k) for k in values)
    args = [values.get(p) for p in params[: last + 1]]
    with torch.no_grad():
        by_position = model.model(batch["input_ids"], *args, use_cache=False).last_hidden_state
        by_name = model.model(batch["input_ids"], **values, use_cache=False).last_hidden_state
        ref = reference_forward(model, batch["input_ids"], attention_mask=batch["attention_mask"], hidden_only=True,
                                pixel_values_videos=batch["pixel_values_videos"])
    assert torch.equal(by_position, by_name)
    assert rel_err(by_name, ref, batch["attention_mask"]) < 1e-5


def test_mistral3_break_tokens_stay_text():
    """Pixtral prompts split an image's placeholders into rows with [IMG_BREAK] and close them with [IMG_END]:
    those are text tokens (stock embeds them as text), so they run the deep layers while the image rows go to the
    side branch; logits equal the reference, with two images of different sizes."""
    from families import vision_inputs

    model = dpvr_kernels.patch(tiny_family("mistral3", seed=14), route_layer=2)
    inputs, per_image, _ = vision_inputs(model, 2, 0, seed=15)
    brk, end = 10, 11
    ids: list[int] = [1, 5]
    for (_h, w), n in zip(inputs["image_sizes"].tolist(), per_image, strict=True):
        cols = w // 14 // 2  # patches per row after the 2 x 2 merge
        assert n % cols == 0
        for row in range(n // cols):
            ids += [IMAGE] * cols + [end if row == n // cols - 1 else brk]
        ids += [7]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **inputs}
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    assert rel_err(logits, _reference(model, batch), batch["attention_mask"]) < 1e-5
    vision = batch["input_ids"] == IMAGE
    assert vision.sum() == sum(per_image) and ((batch["input_ids"] == brk) | (batch["input_ids"] == end)).sum() >= 2


def test_ovis2_indicator_tokens_are_text():
    """Ovis2 wraps an image's placeholders in visual indicator tokens, which stock embeds from the visual
    tokenizer's table. They are text here (markers, like Pixtral's [IMG_BREAK]): they run the deep layers with
    the stock embedding; only the placeholders go to the side branch. Logits equal the reference."""
    from families import OVIS2_INDICATORS, vision_inputs

    model = dpvr_kernels.patch(tiny_family("ovis2", seed=16), route_layer=2)
    inputs, per_image, _ = vision_inputs(model, 1, 0, seed=17)
    start, end = OVIS2_INDICATORS[0], OVIS2_INDICATORS[-1]
    ids = torch.tensor([[1, 5, start] + [IMAGE] * per_image[0] + [end, 6, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        plain = model.get_input_embeddings()(ids)
        captured = {}
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
        try:
            model(**batch, use_cache=False)
        finally:
            handle.remove()
    marker = (ids == start) | (ids == end)
    assert not torch.allclose(captured["embeds"][marker], plain[marker])  # stock gives them visual embeddings
    assert rel_err(logits, _reference(model, batch), batch["attention_mask"]) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_generate_equals_dynamic(name):
    """generate(cache_implementation="static") under DPVR-LF (a text-only static cache for the deep layers) gives
    the dynamic cache's tokens, for every class."""
    model = dpvr_kernels.patch(tiny_family(name, seed=18), route_layer=2)
    batch = family_batch(model, _layouts(name), seed=19)
    with torch.no_grad():
        dynamic = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        static = model.generate(**batch, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("name, backend", [("internvl", "inductor"), ("smolvlm", "inductor")]
                         + [(n, "eager") for n in FAMILIES if n not in ("internvl", "smolvlm")])
def test_hf_compiled_generation_with_static_cache(name, backend):
    """transformers' compiled decode (compile_config + static cache, fullgraph: a graph break fails) for every
    class: eager's tokens, one graph for every decode step. Inductor on a Qwen2 decoder (InternVL) and on a decoder
    at model.model.text_model (SmolVLM); Dynamo with the eager backend (the same graph capture, no code
    generation: seconds) on the others."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = dpvr_kernels.patch(tiny_family(name, seed=20, layers=4), route_layer=1)
    batch = family_batch(model, _layouts(name), seed=21)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None, backend=backend)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        compiled = model.generate(**batch, max_new_tokens=NEW, do_sample=False, cache_implementation="static",
                                  compile_config=config)
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1
