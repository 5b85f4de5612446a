"""Tiny random-weight models of every supported LLaVA class, and batches laid out per sample.

A layout is a list of items per sample: ``"T"`` a text token, ``"I"`` an image, ``"V"`` a video. Placeholder
counts come from the model's own vision code (anyres tiles, image-newline rows, pooled video frames), so the
inputs are what each class's processor would make for images of the sizes used here.
"""

from __future__ import annotations

import torch
from tiny import pad_rows
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

IMAGE, VIDEO = 120, 121
FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava")
WITH_VIDEO = ("llava_next_video", "llava_onevision")
_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
_MAX_TILES = 5  # the base tile + a 2 x 2 grid
_FRAMES = 2
# Image sizes (h, w) cycled over the images of a batch: different anyres grids and unpadding.
_SIZES = [(40, 60), (56, 56), (30, 20), (28, 28)]


def text_config(backbone: str = "llama", layers: int = 6, **kw):
    common = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    common.update(kw)
    if backbone == "llama":
        return LlamaConfig(**common)
    if backbone == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(**common)
    if backbone == "qwen2":
        common.setdefault("use_sliding_window", False)
        return Qwen2Config(**common)
    raise ValueError(backbone)


def _clip():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)


def tiny_family(name: str, seed: int = 0, layers: int = 6, text=None, attn: str = "sdpa"):
    """A tiny model of family ``name`` with random weights (eval mode, fp32)."""
    torch.manual_seed(seed)
    if name == "llava":
        cfg = LlavaConfig(text_config=text or text_config(layers=layers), vision_config=_clip(),
                          image_token_id=IMAGE, image_seq_length=4)
        cls = LlavaForConditionalGeneration
    elif name == "vipllava":
        cfg = VipLlavaConfig(text_config=text or text_config(layers=layers), vision_config=_clip(),
                             image_token_id=IMAGE, vision_feature_layers=[-2, -1])
        cls = VipLlavaForConditionalGeneration
    elif name == "llava_next":
        cfg = LlavaNextConfig(text_config=text or text_config(layers=layers), vision_config=_clip(),
                              image_token_id=IMAGE, image_grid_pinpoints=_PINPOINTS)
        cls = LlavaNextForConditionalGeneration
    elif name == "llava_next_video":
        cfg = LlavaNextVideoConfig(text_config=text or text_config(layers=layers), vision_config=_clip(),
                                   image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=_PINPOINTS,
                                   spatial_pool_stride=2)
        cls = LlavaNextVideoForConditionalGeneration
    elif name == "llava_onevision":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        cfg = LlavaOnevisionConfig(text_config=text or text_config("qwen2", layers=layers), vision_config=vision,
                                   image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=_PINPOINTS,
                                   vision_feature_layer=-1)
        cls = LlavaOnevisionForConditionalGeneration
    else:
        raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    # A random model may emit a placeholder id, which DPVR-LF refuses in a decode step (a trained one never does).
    model.generation_config.suppress_tokens = [IMAGE, VIDEO]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _count(features) -> list[int]:
    """Feature rows per image/video from a get_*_features output (a list/tuple of [n, D], or [N, n, D])."""
    if isinstance(features, (list, tuple)):
        return [f.reshape(-1, f.shape[-1]).shape[0] for f in features]
    return [features.shape[-2]] * features.shape[0] if features.dim() == 3 else [features.shape[0]]


def vision_inputs(model, n_images: int, n_videos: int, seed: int = 0) -> tuple[dict, list[int], list[int]]:
    """Random vision inputs for ``n_images`` images and ``n_videos`` videos, and placeholder tokens per item."""
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    anyres = name.startswith(("LlavaNext", "LlavaOnevision"))
    inputs: dict = {}
    per_image: list[int] = []
    per_video: list[int] = []
    with torch.no_grad():
        if n_images:
            if anyres:
                inputs["pixel_values"] = torch.randn(n_images, _MAX_TILES, 3, 28, 28, generator=g)
                inputs["image_sizes"] = torch.tensor([_SIZES[i % len(_SIZES)] for i in range(n_images)])
                out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
            else:
                inputs["pixel_values"] = torch.randn(n_images, 3, 28, 28, generator=g)
                out = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
            per_image = _count(out.pooler_output)
        if n_videos:
            inputs["pixel_values_videos"] = torch.randn(n_videos, _FRAMES, 3, 28, 28, generator=g)
            out = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
            per_video = _count(out.pooler_output)
            if len(per_video) != n_videos:  # one flat tensor for all videos: equal shares
                per_video = [sum(per_video) // n_videos] * n_videos
    return inputs, per_image, per_video


def family_batch(model, layouts: list[list[str]], seed: int = 0, left_pad: bool = True) -> dict:
    """Model inputs for per-sample layouts ('T' text, 'I' image, 'V' video), padded to one length."""
    n_images = sum(item == "I" for layout in layouts for item in layout)
    n_videos = sum(item == "V" for layout in layouts for item in layout)
    inputs, per_image, per_video = vision_inputs(model, n_images, n_videos, seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows, i_img, i_vid = [], 0, 0
    for layout in layouts:
        ids: list[int] = []
        for item in layout:
            if item == "I":
                ids += [IMAGE] * per_image[i_img]
                i_img += 1
            elif item == "V":
                ids += [VIDEO] * per_video[i_vid]
                i_vid += 1
            else:
                ids.append(int(torch.randint(1, IMAGE - 1, (1,), generator=g)))
        rows.append(ids)
    input_ids, mask = pad_rows(rows, left_pad)
    return {"input_ids": input_ids, "attention_mask": mask, **inputs}
