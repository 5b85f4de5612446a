"""Cost model of the dynamic-resolution towers (Qwen2.5-VL, Qwen3-VL, GLM-4V, InternVL, SmolVLM, Mistral3):
token counts against the installed processors and tiny models, tower FLOPs against FlopCounterMode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from dpvr_kernels.flops import cost_model
from dpvr_kernels.presets import NAMED_CONFIGS, named_config, typical_vision
from dpvr_kernels.vision_tokens import VisionWork, grid_work, image_grid, image_work, video_grid, video_work
from dpvr_kernels.vision_towers import tower_for

SIZES = [(28, 28), (37, 91), (91, 37), (200, 333), (333, 200), (480, 640), (517, 1023), (1000, 61)]
DYNAMIC_NAMES = [n for n in NAMED_CONFIGS if typical_vision(n).tower_tokens]


def _image(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Named configs: parameters against the meta-device model
# ---------------------------------------------------------------------------------------------------------


def test_named_dynamic_configs_exist():
    assert {"qwen2.5-vl-7b", "qwen2.5-vl-3b", "qwen3-vl-8b", "qwen3-vl-2b", "internvl3-8b", "smolvlm2-2.2b",
            "glm-4.1v-9b"} <= set(DYNAMIC_NAMES)


@pytest.mark.parametrize(("name", "expected"), [
    ("qwen2.5-vl-7b", 8_292_166_656), ("qwen2.5-vl-3b", 3_754_622_976), ("qwen3-vl-8b", 8_767_123_696),
    ("qwen3-vl-2b", 2_127_532_032), ("internvl3-8b", 7_944_300_032), ("smolvlm2-2.2b", 2_246_784_880),
    ("glm-4.1v-9b", 10_292_777_472),
])
def test_named_dynamic_params_pinned(name, expected):
    assert cost_model(name, typical_vision(name), 64).params_total == expected


# ---------------------------------------------------------------------------------------------------------
# Tiny configs of every family
# ---------------------------------------------------------------------------------------------------------


def _qwen25(**vision):
    v = dict(depth=4, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3])
    v.update(vision)
    t = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    return Qwen2_5_VLConfig(text_config=t, vision_config=v, image_token_id=290, video_token_id=291)


def _qwen3():
    v = dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
    t = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=300, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    return Qwen3VLConfig(text_config=t, vision_config=v, image_token_id=290, video_token_id=291)


def _glm():
    v = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=48, patch_size=14,
             image_size=56, spatial_merge_size=2, temporal_patch_size=2)
    t = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                              "partial_rotary_factor": 0.5})
    return Glm4vConfig(text_config=t, vision_config=v, image_token_id=290, video_token_id=291)


def _internvl():
    v = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=56,
             patch_size=14)
    t = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300)
    return InternVLConfig(text_config=t, vision_config=v, image_token_id=290, image_seq_length=4)


def _smolvlm():
    v = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=42,
             patch_size=14)
    t = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300)
    return SmolVLMConfig(text_config=t, vision_config=v, image_token_id=290, scale_factor=3)


def _mistral3():
    v = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=112,
             patch_size=14, head_dim=16)
    t = dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, head_dim=16)
    return Mistral3Config(text_config=t, vision_config=v, image_token_index=290, spatial_merge_size=2)


TINY = {
    "qwen2_5_vl": (_qwen25, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (_qwen3, Qwen3VLForConditionalGeneration),
    "glm4v": (_glm, Glm4vForConditionalGeneration),
    "internvl": (_internvl, InternVLForConditionalGeneration),
    "smolvlm": (_smolvlm, SmolVLMForConditionalGeneration),
    "mistral3": (_mistral3, Mistral3ForConditionalGeneration),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_params_match_meta_model(kind):
    make, cls = TINY[kind]
    cfg = make()
    with torch.device("meta"):
        model = cls(cfg)
    rep = cost_model(cfg, image_work(cfg, 100, 150), 5)
    assert rep.params_total == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Token counts against the installed image processors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen3-vl-8b"])
def test_qwen_grid_matches_image_processor(name, size):
    cfg = named_config(name)
    patch = cfg.vision_config.patch_size
    lo, hi = (3136, 12845056) if name.startswith("qwen2.5") else (65536, 16777216)
    proc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=lo, max_pixels=hi)
    out = proc(images=[_image(*size)], return_tensors="pt")
    assert tuple(out["image_grid_thw"][0].tolist()) == image_grid(cfg, *size)
    small = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=56 * 56, max_pixels=200 * 200)
    out = small(images=[_image(*size)], return_tensors="pt")
    assert tuple(out["image_grid_thw"][0].tolist()) == image_grid(cfg, *size, min_pixels=56 * 56,
                                                                  max_pixels=200 * 200)


@pytest.mark.parametrize("size", SIZES)
def test_glm_grid_matches_image_processor(size):
    cfg = named_config("glm-4.1v-9b")
    out = Glm4vImageProcessorPil()(images=[_image(*size)], return_tensors="pt")
    assert tuple(out["image_grid_thw"][0].tolist()) == image_grid(cfg, *size)


@pytest.mark.parametrize("size", SIZES)
def test_internvl_tiles_match_image_processor(size):
    cfg = named_config("internvl3-8b")
    proc = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12)
    tiles = proc(images=[_image(*size)], return_tensors="pt")["pixel_values"].shape[0]
    work = image_work(cfg, *size)
    assert work.tower_passes == tiles and work.tokens == 256 * tiles and work.marker_tokens == 2
    assert proc.get_number_of_image_patches(*size, {}) == tiles


@pytest.mark.parametrize("size", [*SIZES, (384, 384), (385, 700), (1536, 1000)])
def test_smolvlm_tiles_match_image_processor(size):
    cfg = named_config("smolvlm2-2.2b")
    proc = SmolVLMImageProcessorPil(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384})
    tiles = proc(images=[_image(*size)], return_tensors="pt")["pixel_values"].shape[1]
    work = image_work(cfg, *size)
    assert work.tower_passes == tiles and work.tokens == 81 * tiles


@pytest.mark.parametrize("size", SIZES)
def test_pixtral_grid_matches_image_processor(size):
    cfg = _mistral3()
    proc = PixtralImageProcessorPil(size={"longest_edge": 112}, patch_size={"height": 28, "width": 28})
    h, w = proc(images=[_image(*size)], return_tensors="pt")["image_sizes"][0].tolist()
    work = image_work(cfg, *size)
    assert work.tokens == (h // 28) * (w // 28)
    assert work.marker_tokens == h // 28  # one [IMG_BREAK] per row but the last, then [IMG_END]: text tokens


# ---------------------------------------------------------------------------------------------------------
# Token counts against the tiny models' own feature extraction
# ---------------------------------------------------------------------------------------------------------


def _grid_features(model, cfg, grid):
    t, h, w = grid
    patch, temporal = cfg.vision_config.patch_size, cfg.vision_config.temporal_patch_size
    pixels = torch.randn(t * h * w, 3 * temporal * patch * patch)
    out = model.model.get_image_features(pixel_values=pixels, image_grid_thw=torch.tensor([grid]), return_dict=True)
    return sum(f.shape[0] for f in out.pooler_output)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_grid_models_give_the_counted_tokens(kind):
    make, cls = TINY[kind]
    cfg = make()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    for size in [(60, 90), (200, 130), (28, 300)]:
        grid = image_grid(cfg, *size, min_pixels=28 * 28, max_pixels=240 * 240)
        with torch.no_grad():
            assert _grid_features(model, cfg, grid) == image_work(cfg, *size, min_pixels=28 * 28,
                                                                  max_pixels=240 * 240).tokens


def _rows(feats) -> int:
    """Feature vectors in a tensor ``[..., D]`` or a list of them."""
    if isinstance(feats, (list, tuple)):
        return sum(_rows(f) for f in feats)
    return feats.reshape(-1, feats.shape[-1]).shape[0]


@pytest.mark.parametrize("kind", ["internvl", "smolvlm", "mistral3"])
def test_tiled_models_give_the_counted_tokens(kind):
    make, cls = TINY[kind]
    cfg = make()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    for size in [(60, 90), (200, 130)]:
        if kind == "internvl":
            proc = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=6)
            pixels = proc(images=[_image(*size)], return_tensors="pt")["pixel_values"]
            feats = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            n = _rows(feats)
            work = image_work(cfg, *size, max_tiles=6)
        elif kind == "smolvlm":
            proc = SmolVLMImageProcessorPil(size={"longest_edge": 168}, max_image_size={"longest_edge": 42})
            pixels = proc(images=[_image(*size)], return_tensors="pt")["pixel_values"]
            feats = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            n = _rows(feats)
            work = image_work(cfg, *size, longest_edge=168)
        else:
            proc = PixtralImageProcessorPil(size={"longest_edge": 112}, patch_size={"height": 28, "width": 28})
            out = proc(images=[_image(*size)], return_tensors="pt")
            feats = model.model.get_image_features(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                                                   return_dict=True).pooler_output
            n = sum(f.shape[0] for f in feats)
            work = image_work(cfg, *size)
        assert n == work.tokens


def test_qwen_video_grid_and_model():
    cfg = _qwen25()
    grid = video_grid(cfg, 5, 100, 150, min_pixels=28 * 28, max_pixels=120 * 120)
    assert grid[0] == 3  # 5 frames padded to 6, two per temporal patch
    work = video_work(cfg, 5, 100, 150, min_pixels=28 * 28, max_pixels=120 * 120)
    assert work.videos == 1 and work.tokens == grid[0] * grid[1] * grid[2] // 4
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    t, h, w = grid
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=torch.randn(t * h * w, 3 * 2 * 14 * 14),
                                             video_grid_thw=torch.tensor([grid]), return_dict=True)
    assert sum(f.shape[0] for f in out.pooler_output) == work.tokens
    assert video_grid(_qwen3(), 8, 100, 150)[0] == 4


# ---------------------------------------------------------------------------------------------------------
# Tower FLOPs against FlopCounterMode (eager attention runs each window / slice / tile on its own)
# ---------------------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.convolution")


def _measure(fn) -> tuple[int, int]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    table = counter.get_flop_counts()["Global"]
    linear = sum(n for op, n in table.items() if str(op) in MATMUL_OPS)
    return linear, sum(n for op, n in table.items() if str(op) == "aten.bmm")


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_grid_tower_flops_match_flop_counter(kind):
    make, cls = TINY[kind]
    cfg = make()
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    grid = (1, 10, 14) if kind != "qwen3_vl" else (1, 8, 12)  # merged grid 5 x 7: windows of 2 cut 2 + 2 + 1
    work = grid_work(cfg, *grid)
    linear, attention = _measure(lambda: _grid_features(model, cfg, grid))
    tower = tower_for(cfg, cfg.text_config.hidden_size)
    t_linear, t_attn = tower.tower_flops(work)
    assert attention == t_attn
    assert linear == t_linear + tower.projector_flops(work)


def test_qwen25_windows_are_counted_exactly():
    cfg = _qwen25()
    work = grid_work(cfg, 1, 10, 14)  # merged 5 x 7, windows of 56 // 2 // 14 = 2 merged tokens a side
    window = 16 * (2 * 2**2 + 1) * (3 * 2**2 + 1)
    assert work.tower_pairs == 2 * 140 * 140 + 2 * window
    assert grid_work(_qwen25(fullatt_block_indexes=[0, 1, 2, 3]), 1, 10, 14).tower_pairs == 4 * 140 * 140


@pytest.mark.parametrize("kind", ["internvl", "smolvlm"])
def test_tiled_tower_flops_match_flop_counter(kind):
    make, cls = TINY[kind]
    cfg = make()
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    tiles = 3
    side = cfg.vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    pixels = torch.randn(tiles, 3, side, side) if kind == "internvl" else torch.randn(1, tiles, 3, side, side)
    linear, attention = _measure(lambda: model.model.get_image_features(pixel_values=pixels))
    one = image_work(cfg, 10, 10, max_tiles=1) if kind == "internvl" else image_work(cfg, 10, 10, longest_edge=side)
    assert one.tower_passes == 1
    work = one * tiles
    tower = tower_for(cfg, cfg.text_config.hidden_size)
    t_linear, t_attn = tower.tower_flops(work)
    assert attention == t_attn
    assert linear == t_linear + tower.projector_flops(work)


def test_cost_model_breakdown_for_a_dynamic_image():
    rep = cost_model("qwen2.5-vl-7b", image_work(named_config("qwen2.5-vl-7b"), 720, 1280), 64)
    tower = tower_for(named_config("qwen2.5-vl-7b"), 3584)
    work = image_work(named_config("qwen2.5-vl-7b"), 720, 1280)
    assert rep.image_tokens == work.tokens == 26 * 46
    assert rep.flops_breakdown_stock["vision_tower"] == sum(tower.tower_flops(work))
    assert rep.flops_breakdown_stock["projector"] == tower.projector_flops(work)
    assert rep.ideal_prefill_speedup > 1 and "1 image(s), 0 video(s)" in rep.vision_summary()
    two = cost_model("qwen2.5-vl-7b", work + work, 64)
    assert two.flops_breakdown_stock["vision_tower"] == 2 * rep.flops_breakdown_stock["vision_tower"]


def test_dynamic_errors_name_the_fix():
    with pytest.raises(ValueError, match="image_work"):
        cost_model("qwen3-vl-8b", 880, 64)
    with pytest.raises(ValueError, match="height and width"):
        image_work(named_config("internvl3-8b"))
    with pytest.raises(ValueError, match="text_config"):
        tower_for(named_config("llava-1.5-7b"), 4096)
    with pytest.raises(ValueError, match="video token counts are modelled"):
        video_work(named_config("glm-4.1v-9b"), 4, 100, 100)
    assert isinstance(image_work(named_config("qwen3-vl-2b"), 64, 64), VisionWork)
