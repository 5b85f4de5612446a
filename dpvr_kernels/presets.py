"""Model presets: configs with the exact shapes of public LLaVA-family, Qwen2.5-VL, Qwen3-VL, InternVL3,
SmolVLM2 and GLM-4.1V checkpoints (each builder's docstring names its sources), scaled-down LLaVA
configs for CPU demos and tests, and the CLI's ``--size`` choices. Building a model from any of them gives
random weights; the cost model (:mod:`dpvr_kernels.flops`) reads them without building anything.
"""

from __future__ import annotations

from typing import Any

from .config import as_int

__all__ = [
    "NAMED_CONFIGS",
    "SIZES",
    "TYPICAL_INPUTS",
    "named_config",
    "scaled_config",
    "size_config",
    "typical_vision",
]

#: Names accepted by :func:`named_config` (and by :func:`dpvr_kernels.cost_model` in place of a config).
NAMED_CONFIGS: tuple[str, ...] = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-next-7b",
    "llava-onevision-7b",
    "bakllava-7b",
    "qwen2.5-vl-7b",
    "qwen2.5-vl-3b",
    "qwen3-vl-8b",
    "qwen3-vl-2b",
    "internvl3-8b",
    "smolvlm2-2.2b",
    "glm-4.1v-9b",
)

#: The vision input each named model is typically shown: one image of (height, width) pixels (its tower's
#: size for LLaVA-1.5 and BakLLaVA; for the anyres models an image that fills their tiles: 672 px, 2 x 2
#: tiles of LLaVA-NeXT, 2928 tokens; 768 px, 2 x 2 SigLIP tiles of LLaVA-OneVision, 3699 tokens).
TYPICAL_INPUTS: dict[str, tuple[int, int]] = {
    "llava-1.5-7b": (336, 336),
    "llava-1.5-13b": (336, 336),
    "llava-next-7b": (672, 672),
    "llava-onevision-7b": (768, 768),
    "bakllava-7b": (336, 336),
    # dynamic-resolution models: one 720 x 1280 (HD) image, at each checkpoint's processor settings
    "qwen2.5-vl-7b": (720, 1280),
    "qwen2.5-vl-3b": (720, 1280),
    "qwen3-vl-8b": (720, 1280),
    "qwen3-vl-2b": (720, 1280),
    "internvl3-8b": (720, 1280),
    "smolvlm2-2.2b": (720, 1280),
    "glm-4.1v-9b": (720, 1280),
}

#: ``--size`` choices of the command line (:func:`size_config`).
SIZES: tuple[str, ...] = ("tiny", "cpu", "7b")

#: LLaVA-NeXT's tile resolutions (height, width), as in llava-hf/llava-v1.6-*.
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _clip_336(image_size: int = 336, patch_size: int = 14, hidden: int = 1024, intermediate: int = 4096,
              layers: int = 24, heads: int = 16) -> Any:
    """CLIP ViT-L/14 at 336 px (the tower of LLaVA-1.5, -NeXT, BakLLaVA), or a scaled one."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
           max_position_embeddings: int = 4096) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5)


def _llava_config(*, name: str, text_config: Any, vision_config: Any, image_token_id: int) -> Any:
    from transformers import LlavaConfig

    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    cfg = LlavaConfig(text_config=text_config, vision_config=vision_config, image_token_id=image_token_id,
                      image_seq_length=patches, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    cfg.name_or_path = name
    return cfg


def _vicuna_7b() -> Any:
    return _llama(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064)


def named_config(name: str) -> Any:
    """A config with the exact shapes of a public LLaVA-family checkpoint (random weights when built).

    * ``"llava-1.5-7b"`` (``LlavaConfig``): Vicuna-7B (hidden 4096, intermediate 11008, 32 layers, 32 heads,
      32 KV heads, vocab 32064) + CLIP ViT-L/14-336 (hidden 1024, intermediate 4096, 24 layers, 16 heads;
      336 px, patch 14: 576 image tokens), projector 1024 -> 4096 -> 4096 with GELU, image_token_id 32000,
      ``vision_feature_layer=-2``, strategy ``"default"``.
    * ``"llava-1.5-13b"``: Vicuna-13B (hidden 5120, intermediate 13824, 40 layers, 40 heads) + the same tower.
    * ``"llava-next-7b"`` (``LlavaNextConfig``, llava-v1.6-vicuna-7b): the LLaVA-1.5-7B backbone and tower,
      anyres tiles ``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]``, a learned
      ``image_newline``: 2928 image tokens for a 672 x 672 image (see :mod:`dpvr_kernels.vision_tokens`).
    * ``"llava-onevision-7b"`` (``LlavaOnevisionConfig``, llava-onevision-qwen2-7b): Qwen2-7B (hidden 3584,
      intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 152128) + SigLIP-so400m/14 at 384 px
      (hidden 1152, intermediate 4304, 26 layers, 16 heads: 729 tokens per tile), ``anyres_max_9``, strategy
      ``"full"``, ``vision_feature_layer=-1``, image/video token ids 151646/151647.
    * ``"bakllava-7b"`` (``LlavaConfig``, bakLlava-v1): Mistral-7B-v0.1 (hidden 4096, intermediate 14336,
      32 layers, 32 heads, 8 KV heads, vocab 32064, ``sliding_window`` 4096, 32768 positions) + the CLIP
      tower of LLaVA-1.5.
    * The dynamic-resolution models (:func:`_qwen2_5_vl`, :func:`_qwen3_vl`, :func:`_internvl3_8b`,
      :func:`_smolvlm2_2b`, :func:`_glm41v_9b` say where each number comes from): ``"qwen2.5-vl-7b"``,
      ``"qwen2.5-vl-3b"``, ``"qwen3-vl-8b"``, ``"qwen3-vl-2b"``, ``"internvl3-8b"``, ``"smolvlm2-2.2b"``,
      ``"glm-4.1v-9b"``.

    Raises:
        ValueError: for an unknown name (lists :data:`NAMED_CONFIGS`).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "llava-1.5-7b":
        return _llava_config(name=key, text_config=_vicuna_7b(), vision_config=_clip_336(), image_token_id=32000)
    if key == "llava-1.5-13b":
        text = _llama(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32064)
        return _llava_config(name=key, text_config=text, vision_config=_clip_336(), image_token_id=32000)
    if key == "bakllava-7b":
        from transformers import MistralConfig

        text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32064,
                             max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5)
        return _llava_config(name=key, text_config=text, vision_config=_clip_336(), image_token_id=32000)
    if key == "llava-next-7b":
        from transformers import LlavaNextConfig

        cfg = LlavaNextConfig(text_config=_vicuna_7b(), vision_config=_clip_336(), image_token_index=32000,
                              image_grid_pinpoints=_NEXT_PINPOINTS, projector_hidden_act="gelu",
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              image_seq_length=576)
        cfg.name_or_path = key
        return cfg
    if key == "llava-onevision-7b":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
        cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=151646,
                                   video_token_index=151647, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                   tie_word_embeddings=False)
        cfg.name_or_path = key
        return cfg
    if key in _DYNAMIC:
        cfg = _DYNAMIC[key]()
        cfg.name_or_path = key
        return cfg
    raise ValueError(f"unknown config name {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")


def typical_vision(name: str) -> Any:
    """The :class:`~dpvr_kernels.vision_tokens.VisionWork` of one typical image for a named config
    (:data:`TYPICAL_INPUTS`)."""
    from .vision_tokens import image_work

    key = name.strip().lower()
    height, width = TYPICAL_INPUTS[key]
    return image_work(named_config(key), height, width)


def size_config(size: str) -> Any:
    """The ``LlavaConfig`` of a command-line ``--size``.

    * ``"tiny"``: decoder 4 layers x 128 (4 heads), vocab 1000, CLIP 2 layers x 64 on 56 px / patch 14
      (16 image tokens per image); for tests, runs in seconds.
    * ``"cpu"``: :func:`scaled_config` (decoder 16 layers x 1024, 144 image tokens).
    * ``"7b"``: :func:`named_config` ``("llava-1.5-7b")`` (a GPU size).

    Raises:
        ValueError: for an unknown size (lists :data:`SIZES`).
    """
    if size == "tiny":
        return scaled_config(hidden=128, layers=4, heads=4, vocab=1000, vision_hidden=64, vision_layers=2,
                             vision_heads=2, image_size=56, patch_size=14, name="llava-tiny-h128-l4")
    if size == "cpu":
        return scaled_config()
    if size == "7b":
        return named_config("llava-1.5-7b")
    raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")


def scaled_config(
    hidden: int = 1024,
    layers: int = 16,
    heads: int = 16,
    intermediate: int | None = None,
    kv_heads: int | None = None,
    vocab: int = 32064,
    vision_hidden: int = 256,
    vision_intermediate: int | None = None,
    vision_layers: int = 4,
    vision_heads: int = 4,
    image_size: int = 168,
    patch_size: int = 14,
    image_token_id: int | None = None,
    name: str | None = None,
) -> Any:
    """A LLaVA-1.5-shaped ``LlavaConfig`` scaled down for CPU demos and tests.

    The default is a 16-layer, 1024-wide Llama decoder with a 4-layer, 256-wide CLIP tower on 168 px
    images with patch 14, i.e. 12 x 12 = 144 image tokens per image.

    Args:
        hidden, layers, heads: decoder width, depth and attention heads.
        intermediate: decoder MLP width; default keeps LLaVA-1.5-7B's ratio (11008 / 4096), rounded up to a
            multiple of 64.
        kv_heads: KV heads (GQA); default ``heads``.
        vocab: vocabulary size.
        vision_hidden, vision_intermediate, vision_layers, vision_heads: CLIP tower shape;
            ``vision_intermediate`` defaults to ``4 * vision_hidden``.
        image_size, patch_size: image and patch side in pixels; tokens per image ``(image_size // patch_size) ** 2``.
        image_token_id: default 32000 if it fits the vocabulary, else ``vocab - 1``.
        name: name shown in reports; default ``"llava-scaled-h{hidden}-l{layers}"``.

    Raises:
        ValueError: if a size is not positive, heads do not divide the widths, or the image is not a
            whole number of patches.
    """
    if intermediate is None:
        intermediate = -(-hidden * 11008 // (4096 * 64)) * 64
    if kv_heads is None:
        kv_heads = heads
    if vision_intermediate is None:
        vision_intermediate = 4 * vision_hidden
    sizes = {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "intermediate": intermediate,
        "kv_heads": kv_heads,
        "vocab": vocab,
        "vision_hidden": vision_hidden,
        "vision_intermediate": vision_intermediate,
        "vision_layers": vision_layers,
        "vision_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    for key, value in sizes.items():
        if as_int(value, key) <= 0:
            raise ValueError(f"scaled_config: {key} must be > 0, got {value}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"scaled_config: heads={heads} must divide hidden={hidden} and kv_heads={kv_heads} must divide heads"
        )
    if vision_hidden % vision_heads:
        raise ValueError(
            f"scaled_config: vision_heads={vision_heads} must divide vision_hidden={vision_hidden}"
        )
    if image_size % patch_size:
        raise ValueError(
            f"scaled_config: image_size={image_size} must be a multiple of patch_size={patch_size} "
            f"(e.g. {image_size // patch_size * patch_size or patch_size})"
        )
    if image_token_id is None:
        image_token_id = 32000 if vocab > 32000 else vocab - 1
    if not 0 <= image_token_id < vocab:
        raise ValueError(f"scaled_config: image_token_id={image_token_id} must be in [0, vocab={vocab})")
    return _llava_config(
        name=name or f"llava-scaled-h{hidden}-l{layers}",
        text_config=_llama(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                           vocab=vocab),
        vision_config=_clip_336(image_size=image_size, patch_size=patch_size, hidden=vision_hidden,
                                intermediate=vision_intermediate, layers=vision_layers, heads=vision_heads),
        image_token_id=image_token_id,
    )


# --------------------------------------------------------------------------------------------------------
# Dynamic-resolution models (no weights are downloaded: the shapes are written out here)
# --------------------------------------------------------------------------------------------------------


def _qwen2_5_vl(size: str) -> Any:
    """Qwen/Qwen2.5-VL-7B-Instruct or -3B-Instruct.

    Sources: the checkpoints' config.json as quoted in public code (vLLM / TensorRT-LLM tests and model
    dumps). 7B: Qwen2.5-7B decoder (hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab
    152064, untied). 3B: hidden 2048, intermediate 11008, 36 layers, 16 heads, 2 KV heads, vocab 151936, tied
    embeddings. Both: rope_theta 1e6, 128000 positions, ViT of depth 32, hidden 1280, intermediate 3420, 16
    heads, patch 14, temporal patch 2, merge 2, window 112 px, full attention in blocks 7, 15, 23, 31,
    ``out_hidden_size`` = the decoder width; image / video token ids 151655 / 151656.
    """
    from transformers import Qwen2_5_VLConfig

    big = size == "7b"
    hidden = 3584 if big else 2048
    text = dict(hidden_size=hidden, intermediate_size=18944 if big else 11008, num_hidden_layers=28 if big else 36,
                num_attention_heads=28 if big else 16, num_key_value_heads=4 if big else 2,
                vocab_size=152064 if big else 151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_theta=1000000.0, tie_word_embeddings=not big)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2, out_hidden_size=hidden, hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            tie_word_embeddings=not big)


def _qwen3_vl(size: str) -> Any:
    """Qwen/Qwen3-VL-8B-Instruct or -2B-Instruct.

    Sources: the checkpoints' config.json as quoted in public code. 8B: Qwen3-8B decoder (hidden 4096,
    intermediate 12288, 36 layers, 32 heads, 8 KV heads, head_dim 128, vocab 151936, untied); ViT depth 27,
    hidden 1152, intermediate 4304, 16 heads (SigLIP-2 so400m shape), DeepStack layers 8, 16, 24. 2B: hidden
    2048, intermediate 6144, 28 layers, 16 heads, 8 KV heads, head_dim 128, tied embeddings; ViT depth 24,
    hidden 1024, intermediate 4096, 16 heads, DeepStack layers 5, 11, 17. Both: patch 16, temporal patch 2,
    merge 2, 2304 position embeddings, ``out_hidden_size`` = the decoder width, rope_theta 5e6, 262144
    positions, image / video token ids 151655 / 151656.
    """
    from transformers import Qwen3VLConfig

    big = size == "8b"
    hidden = 4096 if big else 2048
    text = dict(hidden_size=hidden, intermediate_size=12288 if big else 6144, num_hidden_layers=36 if big else 28,
                num_attention_heads=32 if big else 16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                max_position_embeddings=262144, rms_norm_eps=1e-6, rope_theta=5000000.0,
                tie_word_embeddings=not big)
    vision = dict(depth=27 if big else 24, hidden_size=1152 if big else 1024, intermediate_size=4304 if big else 4096,
                  num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, out_hidden_size=hidden,
                  deepstack_visual_indexes=[8, 16, 24] if big else [5, 11, 17], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         tie_word_embeddings=not big)


def _internvl3_8b() -> Any:
    """OpenGVLab/InternVL3-8B-hf.

    Sources: InternViT-300M-448px-V2_5 is the ``InternVLVisionConfig`` default (transformers documents it as
    the tower of OpenGVLab/InternVL3-1B-hf; the same tower serves InternVL3-8B): hidden 1024, intermediate
    4096, 24 layers, 16 heads, 448 px, patch 14, LayerNorm, mean pooling. Decoder Qwen2.5-7B (hidden 3584,
    intermediate 18944, 28 layers, 28 heads, 4 KV heads) with InternVL3's vocab of 151674 (public config
    dumps), untied; downsample_ratio 0.5 (256 tokens per tile), image token id 151667.
    """
    from transformers import InternVLConfig, Qwen2Config

    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False)
    return InternVLConfig(text_config=text, vision_config={}, image_token_id=151667, downsample_ratio=0.5,
                          image_seq_length=256, vision_feature_layer=-1, tie_word_embeddings=False)


def _smolvlm2_2b() -> Any:
    """HuggingFaceTB/SmolVLM2-2.2B-Instruct.

    Sources: the SmolVLM family's vocab 49280 and image token id 49190 (public config dumps); the 2.2B
    decoder is SmolLM2-1.7B's Llama shape (hidden 2048, intermediate 8192, 24 layers, 32 heads, 32 KV heads,
    rope_theta 130000, untied) and the tower SigLIP so400m/14 at 384 px (hidden 1152, intermediate 4304, 27
    layers, 16 heads), pixel shuffle scale_factor 3 (81 tokens per 384 px tile). Unlike the other named
    configs, these shapes were not checked against the checkpoint's own config.json (no download here): treat
    the parameter count as approximate until they are.
    """
    from transformers import LlamaConfig, SmolVLMConfig

    text = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=49280, max_position_embeddings=16384, rms_norm_eps=1e-5,
                       rope_theta=130000.0, tie_word_embeddings=False)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=384, patch_size=14)
    return SmolVLMConfig(text_config=text, vision_config=vision, image_token_id=49190, scale_factor=3,
                         tie_word_embeddings=False)


def _glm41v_9b() -> Any:
    """zai-org/GLM-4.1V-9B-Thinking: the transformers ``Glm4vConfig`` defaults, which document that checkpoint
    (decoder hidden 4096, intermediate 13696, 40 layers, 32 heads, 2 KV heads, vocab 151552, untied; ViT depth
    24, hidden 1536, 12 heads, 336 px position table, patch 14, merge 2, out 4096, merger width 13696; image /
    video token ids 151343 / 151344)."""
    from transformers import Glm4vConfig

    return Glm4vConfig()


_DYNAMIC = {
    "qwen2.5-vl-7b": lambda: _qwen2_5_vl("7b"),
    "qwen2.5-vl-3b": lambda: _qwen2_5_vl("3b"),
    "qwen3-vl-8b": lambda: _qwen3_vl("8b"),
    "qwen3-vl-2b": lambda: _qwen3_vl("2b"),
    "internvl3-8b": _internvl3_8b,
    "smolvlm2-2.2b": _smolvlm2_2b,
    "glm-4.1v-9b": _glm41v_9b,
}
