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
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    FastVlmConfig,
    FastVlmForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    JanusConfig,
    JanusForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    Ovis2Config,
    Ovis2ForConditionalGeneration,
    PerceptionLMConfig,
    PerceptionLMForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

IMAGE, VIDEO = 120, 121
FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava", "internvl", "mistral3", "smolvlm",
            "idefics3", "deepseek_vl", "deepseek_vl_hybrid", "janus", "ovis2", "fast_vlm", "perception_lm")
#: Ovis2's visual indicator tokens (stock embeds them from the visual tokenizer's table): text tokens here.
OVIS2_INDICATORS = [100, 101, 102, 103, 104]
# Images batched per sample ([B, max images, C, H, W], zero images pad), the decoder at model.model.text_model.
PER_SAMPLE_IMAGES = ("smolvlm", "idefics3")
WITH_VIDEO = ("llava_next_video", "llava_onevision", "perception_lm")
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
    elif name == "internvl":
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                      image_size=[56, 56], patch_size=[14, 14])
        cfg = InternVLConfig(vision_config=vision, text_config=(text or text_config("qwen2", layers=layers)).to_dict(),
                             image_token_id=IMAGE, downsample_ratio=0.5)
        cls = InternVLForConditionalGeneration
    elif name == "mistral3":
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14, head_dim=16)
        cfg = Mistral3Config(vision_config=vision, text_config=(text or text_config("mistral", layers=layers)).to_dict(),
                             image_token_id=IMAGE, spatial_merge_size=2)
        cls = Mistral3ForConditionalGeneration
    elif name in ("deepseek_vl", "janus"):
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14)
        if name == "janus":
            vision["projection_dim"] = 64
        config_cls, cls = ((DeepseekVLConfig, DeepseekVLForConditionalGeneration) if name == "deepseek_vl"
                           else (JanusConfig, JanusForConditionalGeneration))
        cfg = config_cls(vision_config=vision, text_config=(text or text_config(layers=layers)).to_dict(),
                         image_token_id=IMAGE)
    elif name == "deepseek_vl_hybrid":  # a SigLIP tower and a SAM tower on a 2x larger copy of each image
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14)
        high_res = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=112,
                        patch_size=16, global_attn_indexes=[1], mlp_dim=48, window_size=4)
        cfg = DeepseekVLHybridConfig(vision_config=vision, high_res_vision_config=high_res,
                                     text_config=(text or text_config(layers=layers)).to_dict(), image_token_id=IMAGE)
        cls = DeepseekVLHybridForConditionalGeneration
    elif name == "ovis2":
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14, vocab_size=64)
        cfg = Ovis2Config(vision_config=vision, text_config=(text or text_config("qwen2", layers=layers)).to_dict(),
                          image_token_id=IMAGE, visual_indicator_token_ids=OVIS2_INDICATORS, hidden_size=64)
        cls = Ovis2ForConditionalGeneration
    elif name == "fast_vlm":  # stock's tower is timm's FastViT (timm is not installed): any [B, C, h, w] backbone
        vision = dict(model_type="convnext", hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], hidden_size=32)
        cfg = FastVlmConfig(vision_config=vision, text_config=(text or text_config("qwen2", layers=layers)).to_dict(),
                            image_token_id=IMAGE)
        cls = FastVlmForConditionalGeneration
    elif name == "perception_lm":  # stock's tower is timm's PE ViT (timm is not installed): a CLIP ViT with a CLS
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14, model_args={"embed_dim": 32})
        cfg = PerceptionLMConfig(vision_config=vision, text_config=(text or text_config(layers=layers)).to_dict(),
                                 image_token_id=IMAGE, video_token_id=VIDEO, vision_use_cls_token=True,
                                 projector_pooling_ratio=2)
        cls = PerceptionLMForConditionalGeneration
    elif name in PER_SAMPLE_IMAGES:
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14)
        config_cls, cls = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if name == "smolvlm"
                           else (Idefics3Config, Idefics3ForConditionalGeneration))
        cfg = config_cls(vision_config=vision, text_config=(text or text_config(layers=layers)).to_dict(),
                         image_token_id=IMAGE, scale_factor=2)
    else:
        raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")
    # ConvNeXt (FastVLM's stand-in tower) has no attention to choose
    cfg._attn_implementation = {"": attn, "text_config": attn, "vision_config": "eager"} if name == "fast_vlm" else attn
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
    if not n_images and not n_videos:
        return inputs, [], []
    if name.startswith("Mistral3"):  # Pixtral: any size; one patch grid per image
        inputs["pixel_values"] = torch.randn(n_images, 3, 56, 56, generator=g)
        inputs["image_sizes"] = torch.tensor([[(56, 56), (28, 56), (56, 28)][i % 3] for i in range(n_images)])
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        return inputs, _count(out.pooler_output), []
    if name.startswith("DeepseekVLHybrid"):
        inputs["pixel_values"] = torch.randn(n_images, 3, 56, 56, generator=g)
        inputs["high_res_pixel_values"] = torch.randn(n_images, 3, 112, 112, generator=g)
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["high_res_pixel_values"],
                                                 return_dict=True)
        return inputs, _count(out.pooler_output), []
    if name.startswith("PerceptionLM"):  # [n, tiles or frames, C, H, W]: one tile per image, _FRAMES per video
        with torch.no_grad():
            for kind, key, n, per in (("image", "pixel_values", n_images, 1), ("video", "pixel_values_videos", n_videos,
                                                                                 _FRAMES)):
                if n:
                    inputs[key] = torch.randn(n, per, 3, 56, 56, generator=g)
                    out = model.model.get_image_features(inputs[key], return_dict=True)
                    (per_image if kind == "image" else per_video).extend([out.pooler_output.shape[1] * per] * n)
        return inputs, per_image, per_video
    if name.startswith(("SmolVLM", "Idefics3")):
        inputs["pixel_values"] = torch.randn(n_images, 3, 56, 56, generator=g)  # regrouped per sample in family_batch
        return inputs, [(56 // 14) ** 2 // model.config.scale_factor**2] * n_images, []
    side = 64 if name.startswith("FastVlm") else 56 if name.startswith(("InternVL", "DeepseekVL", "Janus", "Ovis2")) else 28
    with torch.no_grad():
        if n_images:
            if anyres:
                inputs["pixel_values"] = torch.randn(n_images, _MAX_TILES, 3, 28, 28, generator=g)
                inputs["image_sizes"] = torch.tensor([_SIZES[i % len(_SIZES)] for i in range(n_images)])
                out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
            else:
                inputs["pixel_values"] = torch.randn(n_images, 3, side, side, generator=g)
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
    if type(model).__name__.startswith(("SmolVLM", "Idefics3")) and "pixel_values" in inputs:
        # [B, most images in a sample, C, H, W]: a sample's images in order, all-zero images as padding
        counts = [layout.count("I") for layout in layouts]
        flat, grouped = inputs["pixel_values"], torch.zeros(len(layouts), max(counts), *inputs["pixel_values"].shape[1:])
        start = 0
        for b, n in enumerate(counts):
            grouped[b, :n] = flat[start : start + n]
            start += n
        inputs["pixel_values"] = grouped
    return {"input_ids": input_ids, "attention_mask": mask, **inputs}
