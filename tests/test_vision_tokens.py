"""Vision-token counts of dpvr_kernels.vision_tokens against the real transformers processors and models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_folder import word_tokenizer
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from dpvr_kernels.flops import cost_model
from dpvr_kernels.presets import named_config
from dpvr_kernels.vision_tokens import VisionWork, anyres_grid, image_work, tokens_per_image, video_work

TILE, PATCH = 28, 14
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# (height, width): square, wide, tall, odd aspect ratios that leave padding rows or columns to strip
SIZES = [(28, 28), (56, 56), (30, 41), (41, 30), (20, 90), (90, 20), (33, 100), (57, 43), (200, 199)]


def _image(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8))


def _count(ids: torch.Tensor, token_id: int) -> int:
    return int((ids == token_id).sum())


def _llama() -> LlamaConfig:
    return LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def _clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=TILE, patch_size=PATCH)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def next_setup(tokenizer):
    config = LlavaNextConfig(text_config=_llama(), vision_config=_clip(), image_grid_pinpoints=NEXT_PINPOINTS,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                              image_grid_pinpoints=NEXT_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor


@pytest.mark.parametrize("size", SIZES)
def test_llava_next_tokens_match_processor_and_model(next_setup, size):
    config, processor = next_setup
    h, w = size
    inputs = processor(images=[_image(h, w)], text=["<image> what is it"], return_tensors="pt")
    work = image_work(config, h, w)
    assert _count(inputs["input_ids"], config.image_token_id) == work.tokens
    assert inputs["pixel_values"].shape[1] == work.tower_passes  # base tile + anyres tiles
    rows, cols = anyres_grid(config, h, w)
    assert work.tower_passes == 1 + rows * cols
    assert work.projector_tokens == work.tower_passes * tokens_per_image(config)


def test_llava_next_model_accepts_the_counted_tokens(next_setup):
    """The model's own packing (unpad + newline) yields exactly as many features as image_work counts."""
    config, processor = next_setup
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    images = [_image(30, 41), _image(90, 20)]
    inputs = processor(images=images, text=["<image> <image> what is it"], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                               return_dict=True).pooler_output
    assert [f.shape[0] for f in feats] == [image_work(config, 30, 41).tokens, image_work(config, 90, 20).tokens]
    with torch.no_grad():
        model(**inputs)  # the stock count check passes


def test_llava_next_7b_numbers():
    cfg = named_config("llava-next-7b")
    assert image_work(cfg, 672, 672) == VisionWork(2928, 5, 2880, images=1)  # 576 + 48*48 + 48 newlines
    assert image_work(cfg, 336, 1008).tokens == 576 + 24 * 72 + 24
    assert image_work(cfg, 500, 700).tokens == 576 + 34 * 48 + 34  # 672x672 grid, 7 padding rows each side
    assert image_work(cfg, 672, 672).tokens == max(image_work(cfg, h, w).tokens for h in range(100, 1100, 97)
                                                   for w in range(100, 1100, 89))


@pytest.fixture(scope="module")
def onevision_setup(tokenizer):
    """A tiny OneVision config and model, its image processor, and the processor's token arithmetic.

    ``LlavaOnevisionProcessor`` cannot be built without torchvision (its video processor needs it), so the
    processor's own counting methods run on an instance that holds just what they read.
    """
    patches = 3  # 42 px tiles, 3 x 3 patches: the video pooling rounds up (ceil(3 / 2) = 2)
    tile = patches * PATCH
    pinpoints = [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=tile, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_grid_pinpoints=pinpoints,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"))
    image_processor = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    counter = object.__new__(LlavaOnevisionProcessor)
    counter.image_processor = image_processor
    counter.num_image_tokens = patches * patches
    counter.vision_feature_select_strategy = "full"
    counter.vision_aspect_ratio = "anyres_max_9"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return config, image_processor, counter, model


@pytest.mark.parametrize("size", [(42, 42), (84, 84), (50, 130), (130, 50), (252, 252), (250, 160), (20, 240)])
def test_onevision_image_tokens_match_processor_and_model(onevision_setup, size):
    config, image_processor, counter, model = onevision_setup
    h, w = size
    tile = config.vision_config.image_size
    work = image_work(config, h, w)
    assert counter._get_number_of_features(h, w, tile, tile) == work.tokens
    pixels = image_processor(images=[_image(h, w)], return_tensors="pt")
    assert pixels["pixel_values"].shape[1] == work.tower_passes
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                                               return_dict=True).pooler_output
    assert feats[0].shape[0] == work.tokens


def test_onevision_large_image_is_shrunk_to_anyres_max_9(onevision_setup):
    config = onevision_setup[0]
    big = image_work(config, 252, 252)  # 6 x 6 tiles: 18 x 18 patches, more than 9 tiles' worth
    assert big.tokens == 9 + 9 * 9 + 9  # shrunk to 9 x 9 patches (ratio 2), one newline per row
    assert big.tower_passes == 37


def test_onevision_multi_image_and_video_match_processor_and_model(onevision_setup):
    config, image_processor, counter, model = onevision_setup
    multi = image_work(config, 84, 84, multi_image=True) + image_work(config, 50, 130, multi_image=True)
    assert multi.tokens == 2 * (counter.num_image_tokens + 1)  # replace_image_token of a multi-image sample
    pixels = image_processor(images=[[_image(84, 84), _image(50, 130)]], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                                               batch_num_images=torch.tensor([2]), return_dict=True).pooler_output
    assert sum(f.shape[0] for f in feats) == multi.tokens

    work = video_work(config, 5)
    assert work.tokens == 5 * 2 * 2 + 1 and work.tower_passes == 5 and work.videos == 1
    assert counter._get_num_multimodal_tokens(video_sizes=[(5, 42, 42)])["num_video_tokens"] == [work.tokens]
    with torch.no_grad():
        video = model.model.get_video_features(pixel_values_videos=torch.randn(1, 5, 3, 42, 42),
                                               return_dict=True).pooler_output
    assert video.reshape(-1, video.shape[-1]).shape[0] == work.tokens


def test_llava_next_video_tokens_match_model():
    tile = 56  # 4 x 4 patches, pooled by 2: 4 tokens per frame
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=tile, patch_size=PATCH)
    config = LlavaNextVideoConfig(text_config=_llama(), vision_config=vision, image_grid_pinpoints=[[tile, tile * 2]],
                                  video_token_index=5, image_token_index=4)
    work = video_work(config, 3)
    assert work.tokens == 3 * 4 and work.projector_tokens == work.tokens  # pooled before the projector
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    with torch.no_grad():
        feats = model.model.get_video_features(pixel_values_videos=torch.randn(1, 3, 3, tile, tile),
                                               return_dict=True).pooler_output
    assert feats.reshape(-1, feats.shape[-1]).shape[0] == work.tokens


def test_cost_model_prices_tiles_frames_and_newlines():
    cfg = named_config("llava-onevision-7b")
    image, video = image_work(cfg, 768, 768), video_work(cfg, 8)
    assert image == VisionWork(729 + 54 * 54 + 54, 5, 5 * 729, images=1)
    assert video.tokens == 8 * 14 * 14 + 1
    rep = cost_model(cfg, image + video, 32)
    alone = cost_model(cfg, image, 32)
    assert rep.image_tokens == image.tokens + video.tokens and rep.tower_passes == 13
    assert rep.flops_breakdown_stock["vision_tower"] == 13 / 5 * alone.flops_breakdown_stock["vision_tower"]
    assert "1 image(s), 1 video(s)" in rep.vision_summary()
    with pytest.raises(ValueError, match="takes no videos"):
        video_work(named_config("llava-1.5-7b"), 4)
    with pytest.raises(ValueError, match="height and width"):
        image_work(cfg)


def test_siglip_has_no_cls_token():
    cfg = named_config("llava-onevision-7b")
    assert tokens_per_image(cfg) == 27 * 27
    assert tokens_per_image(named_config("llava-1.5-7b")) == 576


@pytest.mark.parametrize("name", ["deepseek_vl", "janus", "ovis2", "fast_vlm", "perception_lm"])
def test_unmodelled_towers_are_refused_not_priced(name):
    """Found by review: DeepSeek-VL's SigLIP tower looked like LLaVA-OneVision's and was priced with LLaVA's rules
    (15 tokens per image where the model gives 16). Classes the cost model does not model are refused by name."""
    from families import tiny_family

    from dpvr_kernels.flops import cost_model

    config = tiny_family(name).config
    with pytest.raises(ValueError, match=rf"model_type '{name}' are not modelled.*config.text_config"):
        image_work(config, 56, 56)
    with pytest.raises(ValueError, match="not modelled"):
        cost_model(config, 16, 10)
    assert cost_model(config.text_config, 16, 10).image_tokens == 16  # the decoder alone is priced
