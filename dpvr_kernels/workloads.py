"""LLaVA-shaped models with random weights and synthetic image+text batches (no downloads).

One place for what the demo, the CLI, the benchmarks and the examples run: a model built from a config
and prompts laid out like LLaVA's (a few text tokens, the image tokens, the question).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from .vision_tokens import tokens_per_image


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    image_tokens: int
    """Image tokens per sample."""
    text_tokens: int
    """Text tokens per sample (without padding)."""

    def as_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}


def set_dpvr(model, enabled: bool, **patch_kwargs) -> None:
    """Switch ``model`` between stock and DPVR-LF (``patch_kwargs`` for :func:`patch`); no-op if already so.

    Benchmarks alternate between the two on one set of weights instead of holding two models.
    """
    from .models.patching import is_patched, patch, unpatch

    current = model.config.dpvr if is_patched(model) else None
    if current is not None and (not enabled or any(v is not None and current.get(k) != v
                                                   for k, v in patch_kwargs.items())):
        unpatch(model)
        current = None
    if enabled and current is None:
        patch(model, **patch_kwargs)


def generate_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids as ``generate`` makes them: count real tokens, pads at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_position_ids(model, attention_mask: Tensor) -> Tensor | None:
    """The ``position_ids`` to pass with a left-padded prompt: :func:`generate_position_ids` for 1-D RoPE classes,
    ``None`` for M-RoPE ones (Qwen-VL, GLM-4V), whose forward derives its 3-D positions from the mask and the
    vision grids (1-D positions would be wrong there)."""
    from .models.classes import model_class
    from .models.positions import ROPE

    return generate_position_ids(attention_mask) if model_class(model).positions == ROPE else None


def greedy(model, logits: Tensor) -> Tensor:
    """Argmax next tokens ``[B, 1]`` of ``logits [B, vocab]``, honouring ``generation_config.suppress_tokens``
    (a random model may emit the image token id, which DPVR-LF refuses in a decode step)."""
    suppress = getattr(model.generation_config, "suppress_tokens", None)
    if suppress:
        logits = logits.clone()
        logits[:, suppress] = -float("inf")
    return logits.argmax(-1, keepdim=True)


def build_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attn: str = "sdpa", seed: int = 0):
    """A ``LlavaForConditionalGeneration`` with random weights, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(config)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    # Initialise directly in the target dtype on the target device (as from_pretrained(dtype=...) does):
    # a 7B model never exists in fp32 first.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    # A random model may emit the image token id; a trained LLaVA never does, and DPVR-LF refuses it in decode.
    model.generation_config.suppress_tokens = [config.image_token_id]
    model.generation_config.eos_token_id = None  # random weights: run every requested step
    model.generation_config.pad_token_id = 0
    return model


def synthetic_batch(config, batch: int, text_tokens: int, images: int = 1, pad: int = 0, seed: int = 0,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Batch:
    """``batch`` prompts of up to ``text_tokens`` text tokens around ``images`` images, left-padded.

    Layout per sample: up to 5 text tokens (a system prefix), the images, the rest of the text. Sample
    ``b`` has ``b * pad // (batch - 1)`` fewer text tokens (a single sample: ``pad``) and as many pad
    tokens on the left, so prompt lengths differ as in a real batch (``pad=0``: no padding).
    """
    if pad >= text_tokens:
        raise ValueError(f"pad ({pad}) must be smaller than text_tokens ({text_tokens})")
    g = torch.Generator().manual_seed(seed)
    per_image = tokens_per_image(config)
    prefix = min(5, text_tokens - pad)
    length = text_tokens + images * per_image
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n_pad = pad if batch == 1 else b * pad // (batch - 1)
        text = torch.randint(3, config.text_config.vocab_size, (text_tokens - n_pad,), generator=g)
        text[text == config.image_token_id] = 3
        image = torch.full((images * per_image,), config.image_token_id)
        ids[b, n_pad:] = torch.cat([text[:prefix], image, text[prefix:]])
        mask[b, n_pad:] = 1
    vc = config.vision_config
    pixels = None
    if images:
        pixels = torch.randn(batch * images, vc.num_channels, vc.image_size, vc.image_size, generator=g)
        pixels = pixels.to(device=device, dtype=dtype)
    return Batch(ids.to(device), mask.to(device), pixels, images * per_image, text_tokens)


def static_cache(model, batch: Batch, steps: int):
    """A static cache for a prompt of ``batch`` and ``steps`` decode steps, sized as ``generate`` sizes it:
    stock's ``StaticCache`` for a stock model; for a patched one a ``DPVRStaticCache`` whose deep layers hold
    the longest text stream (prompt text + new tokens) only."""
    from transformers import StaticCache

    from .models.generation import text_static_cache
    from .models.patching import is_patched

    if not is_patched(model):
        return StaticCache(config=model.config, max_cache_len=batch.input_ids.shape[1] + steps)
    return text_static_cache(model, batch.input_ids, batch.attention_mask, steps, batch.as_kwargs())


def prefill(model, batch: Batch, use_cache: bool = True, cache=None):
    """One forward over the prompts; returns (next greedy tokens ``[B, 1]``, cache). ``cache``: a cache to
    fill (e.g. :func:`static_cache`); None for the model's default (dynamic)."""
    from .models.backbone import CACHE_KW

    pos = generate_position_ids(batch.attention_mask)
    out = model(**batch.as_kwargs(), position_ids=pos, use_cache=use_cache, logits_to_keep=1,
                **({CACHE_KW: cache} if cache is not None else {}))
    return greedy(model, out.logits[:, -1]), getattr(out, CACHE_KW)


def decode(model, batch: Batch, first_tokens: Tensor, cache, steps: int, forward=None) -> Tensor:
    """``steps`` greedy decode steps after :func:`prefill` (what generate does, without its overhead).
    ``forward``: what runs a step (e.g. ``torch.compile(model)``); default ``model``. With a static cache the
    2-D mask has the cache's capacity from the start (as generate's masks do), so every step has the same
    shapes: a compiled step and its CUDA graph are made once."""
    from transformers import StaticCache

    from .models.backbone import CACHE_KW

    forward = model if forward is None else forward
    mask = batch.attention_mask
    pos = mask.sum(-1, keepdim=True) - 1
    length = mask.shape[1]
    if isinstance(cache, StaticCache):
        # the largest layer's capacity (a stock sliding-window layer may hold fewer slots)
        mask = torch.nn.functional.pad(mask, (0, max(layer.max_cache_len for layer in cache.layers) - length))
    tokens, out_tokens = first_tokens, [first_tokens]
    for i in range(steps):
        if isinstance(cache, StaticCache):
            mask = mask.clone()
            mask[:, length + i] = 1
        else:
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        pos = pos + 1
        out = forward(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{CACHE_KW: cache})
        tokens = greedy(model, out.logits[:, -1])
        out_tokens.append(tokens)
    return torch.cat(out_tokens, dim=1)
