"""The supported Hugging Face model classes, one row each: which tokens are vision tokens and where they come from.

Every class here has the same layout (``model.model.<decoder>`` is a Llama-style decoder with rotary embeddings,
``model.model.forward`` embeds the vision features in place of the placeholder tokens), so the patch is the same
for all; a row says where the decoder is, how it takes positions, and which placeholder ids a call routes to the
side branch, and when. A placeholder is a vision token only in a call that carries its features (the pixel
keyword, or the encoder outputs that ``generate`` computes up front), as stock embeds it; elsewhere (every
decode step) it is an ordinary token. Classes whose attention breaks an assumption of DPVR-LF are refused by
name, with the reason (``REFUSED``). Adding a model class is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class VisionInput:
    """One kind of vision input of a model class."""

    kind: str
    """Name in messages and the key of ``mm_encoder_outputs`` that ``generate`` fills (``"image"``, ``"video"``)."""
    token_id: str
    """Config attribute with the placeholder token id."""
    pixels: str
    """Forward keyword that carries the raw inputs."""


IMAGE = VisionInput("image", "image_token_id", "pixel_values")
VIDEO = VisionInput("video", "video_token_id", "pixel_values_videos")
# GLM-4.1V/4.5V mark a video's frames with the image placeholder id (mm_token_type_ids tells them apart).
VIDEO_AS_IMAGE_TOKENS = VisionInput("video", "image_token_id", "pixel_values_videos")


@dataclass(frozen=True)
class ModelClass:
    name: str
    model_type: str
    """``config.model_type`` of its checkpoints (how a folder's config names the class)."""
    backbone: str
    """Backbone of the public checkpoints (documentation; any Llama-style decoder with RoPE is accepted)."""
    inputs: tuple[VisionInput, ...]
    decoder: str = "language_model"
    """Attribute of ``model.model`` that holds the decoder (its ``layers``, ``rotary_emb``, ``norm``)."""
    positions: str = "rope"
    """Position scheme of the decoder (``positions.py``): ``"rope"`` (1-D), ``"mrope"`` (Qwen2-VL's 3-D rows) or
    ``"mrope_text"`` (Qwen3-VL's)."""
    deepstack: bool = False
    """The decoder adds vision features to the vision tokens' states after its first layers (Qwen3-VL's
    deepstack: one per ``config.vision_config.deepstack_visual_indexes``), which must happen before the route."""


SUPPORTED: dict[str, ModelClass] = {
    row.name: row
    for row in (
        ModelClass("LlavaForConditionalGeneration", "llava", "Llama / Vicuna, Mistral (BakLLaVA)", (IMAGE,)),
        ModelClass("LlavaNextForConditionalGeneration", "llava_next", "Vicuna, Mistral, Llama-3", (IMAGE,)),
        ModelClass("LlavaNextVideoForConditionalGeneration", "llava_next_video", "Vicuna", (IMAGE, VIDEO)),
        ModelClass("LlavaOnevisionForConditionalGeneration", "llava_onevision", "Qwen2", (IMAGE, VIDEO)),
        ModelClass("VipLlavaForConditionalGeneration", "vipllava", "Vicuna", (IMAGE,)),
        ModelClass("InternVLForConditionalGeneration", "internvl", "Qwen2, Qwen2.5, Qwen3, Llama", (IMAGE,)),
        ModelClass("Mistral3ForConditionalGeneration", "mistral3", "Mistral Small 3.1", (IMAGE,)),
        ModelClass("SmolVLMForConditionalGeneration", "smolvlm", "SmolLM2 (Llama)", (IMAGE,), decoder="text_model"),
        ModelClass("Idefics3ForConditionalGeneration", "idefics3", "Llama 3", (IMAGE,), decoder="text_model"),
        ModelClass("DeepseekVLForConditionalGeneration", "deepseek_vl", "DeepSeek-LLM (Llama)", (IMAGE,)),
        ModelClass("DeepseekVLHybridForConditionalGeneration", "deepseek_vl_hybrid", "DeepSeek-LLM (Llama)", (IMAGE,)),
        ModelClass("JanusForConditionalGeneration", "janus", "DeepSeek-LLM (Llama); understanding", (IMAGE,)),
        ModelClass("Ovis2ForConditionalGeneration", "ovis2", "Qwen2.5, Qwen3", (IMAGE,)),
        ModelClass("FastVlmForConditionalGeneration", "fast_vlm", "Qwen2", (IMAGE,)),
        ModelClass("PerceptionLMForConditionalGeneration", "perception_lm", "Llama 3", (IMAGE, VIDEO)),
        ModelClass("Qwen2VLForConditionalGeneration", "qwen2_vl", "Qwen2", (IMAGE, VIDEO), positions="mrope"),
        ModelClass("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "Qwen2.5", (IMAGE, VIDEO), positions="mrope"),
        ModelClass("Qwen3VLForConditionalGeneration", "qwen3_vl", "Qwen3", (IMAGE, VIDEO), positions="mrope_text",
                   deepstack=True),
        ModelClass("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", "Qwen3-MoE", (IMAGE, VIDEO),
                   positions="mrope_text", deepstack=True),
        ModelClass("Glm4vForConditionalGeneration", "glm4v", "GLM-4 (partial rotary)", (IMAGE, VIDEO_AS_IMAGE_TOKENS),
                   positions="mrope"),
    )
}


BY_MODEL_TYPE: dict[str, ModelClass] = {row.model_type: row for row in SUPPORTED.values()}

# Classes whose attention or decoder breaks an assumption of DPVR-LF, with the reason: patch() names it.
_LEAVE_STOCK = "leave this model stock (unpatched)"
REFUSED: dict[str, str] = {
    "Gemma3ForConditionalGeneration": "Gemma3 attends bidirectionally within an image, which the causal side "
    "branch does not reproduce; " + _LEAVE_STOCK,
    "PaliGemmaForConditionalGeneration": "PaliGemma is a prefix-LM (the prompt, image included, attends "
    "bidirectionally); " + _LEAVE_STOCK,
    "Gemma3nForConditionalGeneration": "Gemma3n's last layers share the KV of earlier ones, which a text-only deep "
    "cache cannot hold; " + _LEAVE_STOCK,
    "Qwen3_5ForConditionalGeneration": "Qwen3.5 mixes linear-attention (recurrent state) layers with attention "
    "layers, and a routed token set changes the recurrent state; " + _LEAVE_STOCK,
    "Qwen3_5MoeForConditionalGeneration": "Qwen3.5 mixes linear-attention (recurrent state) layers with attention "
    "layers, and a routed token set changes the recurrent state; " + _LEAVE_STOCK,
    "Llama4ForConditionalGeneration": "Llama 4 uses chunked attention and NoPE layers with attention temperature, "
    "which the varlen streams do not implement; " + _LEAVE_STOCK,
    "Cohere2VisionForConditionalGeneration": "its Cohere2 decoder mixes NoPE layers with sliding windows, which "
    "the varlen streams do not implement; " + _LEAVE_STOCK,
    "AyaVisionForConditionalGeneration": "its Cohere2 decoder mixes NoPE layers with sliding windows, which the "
    "varlen streams do not implement; " + _LEAVE_STOCK,
    "Lfm2VlForConditionalGeneration": "LFM2's short-convolution layers carry a state across tokens, which a routed "
    "token set changes; " + _LEAVE_STOCK,
    "MllamaForConditionalGeneration": "Mllama reads the image through cross-attention layers, not image tokens in "
    "the sequence: there is nothing to route; " + _LEAVE_STOCK,
    "Florence2ForConditionalGeneration": "Florence-2 is an encoder-decoder model, not a decoder over image and "
    "text tokens; " + _LEAVE_STOCK,
}


def model_class(model: nn.Module) -> ModelClass:
    """The row of ``model``'s class (or of the supported class it derives from); a clear error otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
        if cls.__name__ in REFUSED:
            raise TypeError(f"dpvr_kernels.patch does not support {cls.__name__}: {REFUSED[cls.__name__]}")
    raise TypeError(
        f"dpvr_kernels.patch does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(SUPPORTED)}. Load the checkpoint with one of them (e.g. AutoModelForImageTextToText)."
    )


def vision_token_ids(config, row: ModelClass | None = None) -> list[int]:
    """The placeholder ids of a class's vision inputs (image, video), from its config (``row``: the config's class)."""
    row = row if row is not None else BY_MODEL_TYPE.get(getattr(config, "model_type", ""))
    names = [v.token_id for v in row.inputs] if row is not None else ["image_token_id", "video_token_id"]
    ids: list[int] = []
    for name in names:
        token = getattr(config, name, None)
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def deepstack_layers(model: nn.Module, row: ModelClass) -> int:
    """How many of the decoder's first layers are followed by a deepstack injection (0 without deepstack)."""
    if not row.deepstack:
        return 0
    return len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())


def _carries(kwargs: dict, vision: VisionInput) -> bool:
    """Whether a call carries features of this input (host-side: shapes only, no device sync)."""
    pixels = kwargs.get(vision.pixels)
    if pixels is not None and pixels.numel() > 0:
        return True
    return (kwargs.get("mm_encoder_outputs") or {}).get(vision.kind) is not None


def carried_inputs(row: ModelClass, kwargs: dict) -> list[VisionInput]:
    """The vision inputs whose features a ``model.model.forward`` call with these keyword arguments carries."""
    return [v for v in row.inputs if _carries(kwargs, v)]


def vision_mask(model: nn.Module, carried: list[VisionInput], input_ids: Tensor | None,
                inputs_embeds: Tensor | None) -> Tensor:
    """bool ``[B, L]``: the placeholders of the carried inputs, found as stock finds them (ids, or embeddings)."""
    mask = None
    for vision in carried:
        token = getattr(model.config, vision.token_id)
        if input_ids is not None:
            hit = input_ids == token
        else:
            emb = model.get_input_embeddings()(torch.full((), token, dtype=torch.long, device=inputs_embeds.device))
            hit = (inputs_embeds == emb).all(-1)
        mask = hit if mask is None else mask | hit
    return mask
