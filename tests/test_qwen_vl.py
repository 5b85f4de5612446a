"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and GLM-4V under DPVR-LF: M-RoPE positions (3 rows from the model's own
``get_rope_index``, compressed after each image, continued from ``rope_deltas`` in decode steps; interleaved in
Qwen3-VL) gathered per token into the text stream and the side branch, and Qwen3-VL's deepstack features added
after the first layers. Logits against the per-sample reference with left and right padding, images of different
sizes and a video in one batch; greedy ``generate`` (dynamic and static cache) against the reference loop;
save/load; side-branch gradients; unpatch; a route layer below the deepstack layers refused."""

from __future__ import annotations

import pytest
import torch
from tiny import check_save_load_round_trip, pad_rows
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

import dpvr_kernels
from dpvr_kernels.reference import reference_forward

IMAGE, VIDEO = 120, 121
CLASSES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v")
QWEN3 = ("qwen3_vl", "qwen3_vl_moe")
FRAMES_SPLIT = ("qwen3_vl", "qwen3_vl_moe", "glm4v")  # a video's frames are separated by timestamp text
DEEPSTACK = 2  # Qwen3-VL injections after decoder layers 0 and 1
PATCH_ROW = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
# Grids (t, h, w) in patches, cycled over a batch's images: 6, 4 and 9 tokens after the 2 x 2 merge.
IMAGE_GRIDS = [(1, 4, 6), (1, 4, 4), (1, 6, 6)]
VIDEO_GRID = (2, 4, 4)  # 8 tokens


def tiny_qwen(name: str, seed: int = 0, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                 video_token_id=VIDEO), Qwen2VLForConditionalGeneration
    elif name == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                      window_size=56)
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                    video_token_id=VIDEO), Qwen2_5_VLForConditionalGeneration
    elif name == "glm4v":
        # GLM-4V: partial rotary (half of the 16-dim heads), M-RoPE sections over the 4 rotary frequencies.
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, image_size=56)
        cfg, cls = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                               video_token_id=VIDEO), Glm4vForConditionalGeneration
    else:
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        if name == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      deepstack_visual_indexes=list(range(DEEPSTACK)), num_position_embeddings=64)
        config_cls, cls = ((Qwen3VLConfig, Qwen3VLForConditionalGeneration) if name == "qwen3_vl"
                           else (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration))
        cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO)
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).eval()
    model.generation_config.suppress_tokens = [IMAGE, VIDEO]  # a random model may emit a placeholder
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def qwen_batch(model, layouts: list[list[str]], seed: int = 0, left_pad: bool = True) -> dict:
    """Inputs as the Qwen processors make them: placeholders per grid, ``mm_token_type_ids``, flat patch rows."""
    g = torch.Generator().manual_seed(seed)
    rows, types, image_grids, video_grids = [], [], [], []
    for layout in layouts:
        ids: list[int] = []
        kinds: list[int] = []  # mm_token_type_ids: 0 text, 1 image, 2 video
        for item in layout:
            if item == "I":
                grid = IMAGE_GRIDS[len(image_grids) % len(IMAGE_GRIDS)]
                image_grids.append(grid)
                ids += [IMAGE] * (grid[0] * grid[1] * grid[2] // 4)
                kinds += [1] * (grid[0] * grid[1] * grid[2] // 4)
            elif item == "V":
                video_grids.append(VIDEO_GRID)
                placeholder = IMAGE if model.config.model_type == "glm4v" else VIDEO  # GLM: image ids
                frame = [placeholder] * (VIDEO_GRID[1] * VIDEO_GRID[2] // 4)
                if model.config.model_type in FRAMES_SPLIT:
                    ids += frame + [7] + frame  # a timestamp (text) between the frames
                    kinds += [2] * len(frame) + [0] + [2] * len(frame)
                else:
                    ids += frame * VIDEO_GRID[0]
                    kinds += [2] * len(frame) * VIDEO_GRID[0]
            else:
                ids.append(int(torch.randint(1, IMAGE - 1, (1,), generator=g)))
                kinds.append(0)
        rows.append(ids)
        types.append(kinds)
    input_ids, mask = pad_rows(rows, left_pad)
    mm_types, _ = pad_rows(types, left_pad)
    batch = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm_types}
    if image_grids:
        grid = torch.tensor(image_grids)
        batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), PATCH_ROW, generator=g)
        batch["image_grid_thw"] = grid
    if video_grids:
        grid = torch.tensor(video_grids)
        batch["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), PATCH_ROW, generator=g)
        batch["video_grid_thw"] = grid
        if isinstance(model, Qwen2_5_VLForConditionalGeneration):
            batch["second_per_grid_ts"] = torch.tensor([1.0] * len(video_grids))
    return batch


LAYOUTS = [["T", "T", "I", "T", "I", "T"], ["T", "V", "T", "T"], ["T", "T", "T", "T"], ["T", "I", "T", "V", "T"]]
# GLM-4V marks video frames with the image id, and its stock forward cannot tell images from videos in one call:
# its batches hold images or videos.
GLM_LAYOUTS = [["T", "T", "I", "T", "I", "T"], ["T", "I", "T", "T"], ["T", "T", "T", "T"]]
GLM_VIDEO_LAYOUTS = [["T", "V", "T", "T"], ["T", "T", "T"], ["T", "T", "V", "T"]]


def layouts(name: str, video: bool = False) -> list[list[str]]:
    if name.startswith("glm4v"):
        return GLM_VIDEO_LAYOUTS if video else GLM_LAYOUTS
    return LAYOUTS


def _rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return ((out[keep] - ref[keep]).abs().max() / ref[keep].abs().max()).item()


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
    assert _rel_err(logits, ref, batch["attention_mask"]) < 1e-5
    # The check has teeth: 1-D positions (what a LLaVA decoder would get) give other logits, and so does stock.
    one_d = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert _rel_err(_reference(model, batch, position_ids=one_d), ref, batch["attention_mask"]) > 1e-3
    with torch.no_grad():
        stock = dpvr_kernels.unpatch(model)(**batch, use_cache=False).logits
    assert _rel_err(stock, ref, batch["attention_mask"]) > 1e-3


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


def test_hf_compiled_generation_with_static_cache():
    """transformers' compiled decode (compile_config + static cache), with M-RoPE positions continued from
    ``rope_deltas``: the same tokens as eager, one graph for every decode step (fullgraph: no graph break)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = dpvr_kernels.patch(tiny_qwen("qwen2_5_vl", seed=13), route_layer=2)
    batch = qwen_batch(model, LAYOUTS, seed=14)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model.generate(**batch, max_new_tokens=6, do_sample=False)
        compiled = model.generate(**batch, max_new_tokens=6, do_sample=False, cache_implementation="static",
                                  compile_config=config)
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1
