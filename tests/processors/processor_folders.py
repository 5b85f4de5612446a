"""Tiny random folders of every supported class with its own processor (image, and video where the class has one;
chat template; small pixel budgets: a few dozen vision tokens per image), made offline: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, GLM-4V, InternVL, Mistral3, SmolVLM, Idefics3, DeepSeek-VL (+ Hybrid), Janus, Ovis2, FastVLM,
PerceptionLM, LLaVA-OneVision, LLaVA-NeXT-Video and VipLLaVA. These processors need torchvision: they run in the
processors environment only."""

from __future__ import annotations

from pathlib import Path

import torch
from model_folder import save_folder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 160
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "what is in the picture describe it a cat dog red blue house sun tree USER ASSISTANT : please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def _special_tokenizer(special: list[str], extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The word tokenizer with ``special`` tokens (``extra``: named ones, e.g. InternVL's ``context_image_token``,
    which the processor reads as tokenizer attributes)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *special, *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left", extra_special_tokens=extra or {})
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer


def _chat_template(image: str) -> str:
    return CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", image)


def _ids(tokenizer, tokens: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _build(folder: Path, seed: int, model_cls, config, processor) -> Path:
    """``model_cls(config)`` with seeded random weights, saved in ``folder`` with ``processor``."""
    torch.manual_seed(seed)
    return save_folder(model_cls(config).eval(), processor, folder)


def _text(backbone: str = "llama", **kw):
    """The folders' 4-layer decoder over the word tokenizer's vocabulary (``llama``, ``qwen2`` or ``mistral``)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=2,
                  eos_token_id=3, pad_token_id=1)
    common.update(kw)
    if backbone == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if backbone == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(**common)


def _vit(**kw) -> dict:
    """A 2-layer ViT tower of 56 px images, 14 px patches (4 x 4 patches), as config keywords (``kw`` overrides)."""
    return {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                   patch_size=14), **kw}


GLM_SPECIAL = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>",
               "<|end_of_video|>"]


def make_qwen_folder(folder: Path, name: str = "qwen2_5_vl", layers: int = 4, seed: int = 1, **shape) -> Path:
    """A tiny random M-RoPE model with its processor, saved in ``folder``: Qwen2-VL, Qwen2.5-VL (patch 14),
    Qwen3-VL (patch 16, deepstack after layers 0 and 1) or GLM-4V (partial rotary; its own image markers).
    ``shape``: decoder overrides (``hidden_size``, ``rope_parameters``, ...)."""
    import transformers as T

    glm = name == "glm4v"
    special = GLM_SPECIAL if glm else SPECIAL
    tok = _special_tokenizer(special)
    ids = _ids(tok, special)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=2, eos_token_id=3,
                pad_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if glm:
        common = dict(image_start_token_id=ids[0], image_end_token_id=ids[1], image_token_id=ids[2],
                      video_token_id=ids[3], video_start_token_id=ids[4], video_end_token_id=ids[5])
        template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                         "<|begin_of_image|><|image|><|end_of_image|>")
    else:
        common = dict(vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
                      video_token_id=ids[3])
        template = CHAT_TEMPLATE
    video_cls = T.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor
    image_cls = T.Qwen2VLImageProcessor
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        prefix, processor_cls = "Qwen2VL", T.Qwen2VLProcessor
    elif name == "qwen2_5_vl":
        vision.update(fullatt_block_indexes=[1], window_size=56)
        prefix, processor_cls = "Qwen2_5_VL", T.Qwen2_5_VLProcessor
    elif name == "qwen3_vl":
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(patch_size=16, deepstack_visual_indexes=[0, 1], num_position_embeddings=64)
        prefix, processor_cls = "Qwen3VL", T.Qwen3VLProcessor
        video_cls = T.models.qwen3_vl.video_processing_qwen3_vl.Qwen3VLVideoProcessor
    elif glm:
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})
        vision.update(image_size=56)
        prefix, processor_cls, image_cls = "Glm4v", T.Glm4vProcessor, T.Glm4vImageProcessor
        video_cls = T.models.glm4v.video_processing_glm4v.Glm4vVideoProcessor
    else:
        raise ValueError(name)
    text.update(shape)
    vision["hidden_size" if name == "qwen2_vl" else "out_hidden_size"] = text["hidden_size"]  # the merger's output
    cfg = getattr(T, f"{prefix}Config")(text_config=text, vision_config=vision, **common)
    patch = vision["patch_size"]
    factor = patch * 2
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor}
    image_processor = image_cls(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    video_processor = video_cls(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                              chat_template=template)
    return _build(folder, seed, getattr(T, f"{prefix}ForConditionalGeneration"), cfg, processor)


def make_internvl_folder(folder: Path, seed: int = 3) -> Path:
    """A tiny random InternVL (Qwen2 decoder, 56 px tiles of 4 tokens, up to 4 tiles + thumbnail) with its
    processor (GotOcr2 tiles, ``<img>``/``</img>`` around ``<IMG_CONTEXT>`` tokens)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    special = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = _special_tokenizer(special, {"start_image_token": "<img>", "end_image_token": "</img>",
                                       "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                            max_patches=4)
    video_processor = InternVLVideoProcessor(size={"height": 56, "width": 56})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                  image_seq_length=4, chat_template=_chat_template("<IMG_CONTEXT>"))
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  image_size=[56, 56], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vision, text_config=_text(backbone="qwen2").to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                         image_seq_length=4)
    return _build(folder, seed, InternVLForConditionalGeneration, cfg, processor)


def make_mistral3_folder(folder: Path, seed: int = 4) -> Path:
    """A tiny random Mistral3 (Pixtral tower, patch 14, 2 x 2 merge, images up to 112 px) with its processor
    (``[IMG]`` rows closed by ``[IMG_BREAK]``, ``[IMG_END]`` last: those two are text tokens under DPVR-LF)."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    special = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _special_tokenizer(special)
    image_processor = PixtralImageProcessor(size={"longest_edge": 112}, patch_size={"height": 14, "width": 14})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14, spatial_merge_size=2,
                                 chat_template=_chat_template("[IMG]"))
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=112,
                  patch_size=14, head_dim=16)
    cfg = Mistral3Config(vision_config=vision, text_config=_text(backbone="mistral").to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return _build(folder, seed, Mistral3ForConditionalGeneration, cfg, processor)


def _idefics_folder(folder: Path, prefix: str, seed: int, video: bool) -> Path:
    """SmolVLM or Idefics3 (Llama decoder at ``model.model.text_model``; 56 px tiles of 4 tokens after a 2x pixel
    shuffle, images up to 112 px: up to 2 x 2 tiles + the global image) with its processor (row/column and global
    markers around ``<image>`` tokens: text under DPVR-LF)."""
    import transformers as T

    special = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", "<video>"]
    tok = _special_tokenizer(special)
    sizes = dict(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    extra = {}
    if video:
        extra["video_processor"] = T.models.smolvlm.video_processing_smolvlm.SmolVLMVideoProcessor(**sizes)
    processor = getattr(T, f"{prefix}Processor")(image_processor=getattr(T, f"{prefix}ImageProcessor")(**sizes),
                                                 tokenizer=tok, image_seq_len=4, chat_template=_chat_template("<image>"),
                                                 **extra)
    cfg = getattr(T, f"{prefix}Config")(vision_config=_vit(), text_config=_text().to_dict(), scale_factor=2,
                                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _build(folder, seed, getattr(T, f"{prefix}ForConditionalGeneration"), cfg, processor)


def make_smolvlm_folder(folder: Path, seed: int = 5) -> Path:
    """A tiny random SmolVLM with its image and video processors (:func:`_idefics_folder`)."""
    return _idefics_folder(folder, "SmolVLM", seed, video=True)


def make_idefics3_folder(folder: Path, seed: int = 6) -> Path:
    """A tiny random Idefics3 with its processor (images only; :func:`_idefics_folder`)."""
    return _idefics_folder(folder, "Idefics3", seed, video=False)


def make_deepseek_folder(folder: Path, name: str = "deepseek_vl", seed: int = 7) -> Path:
    """A tiny random DeepSeek-VL, DeepSeek-VL-Hybrid or Janus (Llama decoder, SigLIP-style tower on 56 px squares:
    16 tokens per image; Hybrid adds a SAM tower on a 112 px copy, Janus ``<begin_of_image>``/``<end_of_image>``
    text markers) with its processor (a fixed ``num_image_tokens`` of ``<image_placeholder>`` per image)."""
    import transformers as T

    prefix = {"deepseek_vl": "DeepseekVL", "deepseek_vl_hybrid": "DeepseekVLHybrid", "janus": "Janus"}[name]
    special = ["<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
    tok = _special_tokenizer(special, {"image_token": special[0], "boi_token": special[1], "eoi_token": special[2]})
    vision, sizes, extra = _vit(), {"size": {"height": 56, "width": 56}}, {}
    if name == "janus":
        vision["projection_dim"] = 64
    if name == "deepseek_vl_hybrid":
        sizes["high_res_size"] = {"height": 112, "width": 112}
        extra["high_res_vision_config"] = dict(hidden_size=32, output_channels=16, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=112, patch_size=16,
                                               global_attn_indexes=[1], mlp_dim=48, window_size=4)
    processor = getattr(T, f"{prefix}Processor")(image_processor=getattr(T, f"{prefix}ImageProcessor")(**sizes),
                                                 tokenizer=tok, num_image_tokens=16,
                                                 chat_template=_chat_template(special[0]))
    cfg = getattr(T, f"{prefix}Config")(vision_config=vision, text_config=_text().to_dict(),
                                        image_token_id=tok.convert_tokens_to_ids(special[0]), **extra)
    return _build(folder, seed, getattr(T, f"{prefix}ForConditionalGeneration"), cfg, processor)


def make_ovis2_folder(folder: Path, seed: int = 8) -> Path:
    """A tiny random Ovis2 (Qwen2 decoder; 56 px tiles of 16 tokens, up to 4 tiles + the whole image) with its
    processor (``<image>`` becomes ``<IMG_ATOM>`` tokens between visual indicator tokens, which stock embeds
    from the visual tokenizer's table: text tokens under DPVR-LF)."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2ImageProcessor, Ovis2Processor

    indicators = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]
    tok = _special_tokenizer(["<image>", "<IMG_ATOM>", *indicators])
    image_processor = Ovis2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=4)
    processor = Ovis2Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=16,
                               chat_template=_chat_template("<image>"))
    cfg = Ovis2Config(vision_config=_vit(vocab_size=64), text_config=_text("qwen2").to_dict(), hidden_size=64,
                      vocab_size=VOCAB, image_token_id=tok.convert_tokens_to_ids("<IMG_ATOM>"),
                      visual_indicator_token_ids=_ids(tok, indicators))
    return _build(folder, seed, Ovis2ForConditionalGeneration, cfg, processor)


def _llava_processor(tok, image_processor, patch: int, strategy: str, extra_tokens: int):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
                          chat_template=_chat_template("<image>"))


def _clip_images(side: int):
    """A CLIP image processor that resizes and crops to ``side`` px squares."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _clip():
    """A CLIP tower of 28 px images (2 x 2 patches + CLS)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**_vit(image_size=28))


def make_vipllava_folder(folder: Path, seed: int = 9) -> Path:
    """A tiny random VipLLaVA (CLIP 28 px, features of its last two layers) with its ``LlavaProcessor`` (4 tokens
    per image: CLS dropped)."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    tok = _special_tokenizer(["<image>"])
    processor = _llava_processor(tok, _clip_images(28), patch=14, strategy="default", extra_tokens=1)
    cfg = VipLlavaConfig(vision_config=_clip(), text_config=_text(), vision_feature_layers=[-2, -1],
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _build(folder, seed, VipLlavaForConditionalGeneration, cfg, processor)


def make_fast_vlm_folder(folder: Path, seed: int = 10) -> Path:
    """A tiny random FastVLM (Qwen2 decoder) with the ``LlavaProcessor`` of its checkpoints (64 px images, stride 32:
    4 tokens). Stock's tower is timm's FastViT (timm is not installed): a ConvNeXt of the same stride stands in."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    tok = _special_tokenizer(["<image>"])
    processor = _llava_processor(tok, _clip_images(64), patch=32, strategy="full", extra_tokens=0)
    vision = dict(model_type="convnext", hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], hidden_size=32)
    cfg = FastVlmConfig(vision_config=vision, text_config=_text("qwen2").to_dict(),
                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _build(folder, seed, FastVlmForConditionalGeneration, cfg, processor)


def make_perception_lm_folder(folder: Path, seed: int = 11) -> Path:
    """A tiny random PerceptionLM (Llama decoder; 56 px tiles, up to 4 + the thumbnail, 4 tokens each after 2x
    pooling) with its processor. Stock's tower is timm's PE ViT (timm is not installed): a CLIP ViT with its CLS
    token stands in."""
    import transformers as T

    tok = _special_tokenizer(["<|image|>", "<|video|>"], {"image_token": "<|image|>", "video_token": "<|video|>"})
    image_processor = T.PerceptionLMImageProcessor(tile_size=56, max_num_tiles=4, size={"height": 56, "width": 56})
    video_processor = T.PerceptionLMVideoProcessor(size={"height": 56, "width": 56})
    processor = T.PerceptionLMProcessor(video_processor=video_processor, image_processor=image_processor,
                                        tokenizer=tok, patch_size=14, pooling_ratio=2,
                                        chat_template=_chat_template("<|image|>"))
    vision = _vit(model_type="clip_vision_model", model_args={"embed_dim": 32})
    cfg = T.PerceptionLMConfig(vision_config=vision, text_config=_text().to_dict(), vision_use_cls_token=True,
                               projector_pooling_ratio=2, image_token_id=tok.image_token_id,
                               video_token_id=tok.video_token_id)
    return _build(folder, seed, T.PerceptionLMForConditionalGeneration, cfg, processor)


PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def make_llava_video_folder(folder: Path, name: str = "llava_onevision", seed: int = 12, **text) -> Path:
    """A tiny random LLaVA-OneVision (SigLIP, Qwen2 decoder) or LLaVA-NeXT-Video (CLIP, Llama decoder): anyres 28 px
    tiles of 4 tokens, grids up to 2 x 2, with its processor (image + video processors). ``text``: decoder shape
    overrides (e.g. ``hidden_size``)."""
    import transformers as T

    tok = _special_tokenizer(["<image>", "<video>"])
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"))
    tile = {"height": 28, "width": 28}
    if name == "llava_onevision":
        image_processor = T.LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=PINPOINTS)
        processor = T.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                              video_processor=T.LlavaOnevisionVideoProcessor(size=tile),
                                              num_image_tokens=4, vision_feature_select_strategy="full",
                                              chat_template=_chat_template("<image>"))
        vision = T.SiglipVisionConfig(**_vit(image_size=28))
        cfg = T.LlavaOnevisionConfig(vision_config=vision, text_config=_text("qwen2", **text),
                                     image_grid_pinpoints=PINPOINTS,
                                     vision_feature_select_strategy="full", vision_feature_layer=-1, **ids)
        return _build(folder, seed, T.LlavaOnevisionForConditionalGeneration, cfg, processor)
    sizes = dict(size={"shortest_edge": 28}, crop_size=tile)
    image_processor = T.LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS, **sizes)
    processor = T.LlavaNextVideoProcessor(image_processor=image_processor, tokenizer=tok,
                                          video_processor=T.LlavaNextVideoVideoProcessor(**sizes), patch_size=14,
                                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                          chat_template=_chat_template("<image>"))
    cfg = T.LlavaNextVideoConfig(vision_config=_clip(), text_config=_text(**text), image_grid_pinpoints=PINPOINTS,
                                 vision_feature_select_strategy="default", vision_feature_layer=-2,
                                 spatial_pool_stride=2, **ids)
    return _build(folder, seed, T.LlavaNextVideoForConditionalGeneration, cfg, processor)
