"""Tiny LLaVA models with random weights, built from configs (no downloads), and their inputs."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

IMAGE_TOKEN = 120
TOKENS_PER_IMAGE = 4  # 28 px / 14 px patches -> 2 x 2


def tiny_config(backbone: str = "llama", layers: int = 6, kv_heads: int = 2, attn: str = "sdpa") -> LlavaConfig:
    common = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=256)
    text = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common, use_sliding_window=False),
    }[backbone]()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                      image_seq_length=TOKENS_PER_IMAGE, projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    return cfg


def tiny_llava(backbone: str = "llama", layers: int = 6, kv_heads: int = 2, attn: str = "sdpa", seed: int = 0,
               dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(backbone, layers, kv_heads, attn))
    # A random model may emit the image token id, which DPVR-LF refuses in decode steps (as it should):
    # keep it out of generations, as a trained LLaVA never produces it.
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    return model.to(dtype).eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference over the valid (mask 1) positions, relative to the reference's max abs value there."""
    valid = mask.bool()
    return ((out.float() - ref.float())[valid].abs().max() / ref.float()[valid].abs().max()).item()


def pad_rows(rows: list[list[int]], left_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded (id 0) to one length: ``input_ids`` and ``attention_mask`` ``[B, L]``."""
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        sl = slice(length - len(ids), length) if left_pad else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        mask[b, sl] = 1
    return input_ids, mask


def make_batch(layouts: list[list[str]], seed: int = 0, dtype: torch.dtype = torch.float32, left_pad: bool = True):
    """Inputs from per-sample token layouts: 'T' text token, 'I' one image (4 tokens), padded to one length.

    Returns input_ids, attention_mask, pixel_values (or None).
    """
    g = torch.Generator().manual_seed(seed)
    rows, n_images = [], 0
    for layout in layouts:
        ids = []
        for item in layout:
            if item == "I":
                ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE
                n_images += 1
            else:
                ids.append(int(torch.randint(1, IMAGE_TOKEN - 1, (1,), generator=g)))
        rows.append(ids)
    input_ids, mask = pad_rows(rows, left_pad)
    pixel_values = torch.randn(n_images, 3, 28, 28, generator=g).to(dtype) if n_images else None
    return input_ids, mask, pixel_values


def check_save_load_round_trip(model, batch: dict, path) -> None:
    """A patched model whose side branch differs from layer r (as a trained one does) saves and comes back with
    ``from_pretrained`` + ``patch()``: same settings, bit-equal logits on ``batch``."""
    import dpvr_kernels
    from dpvr_kernels.models.backbone import side_branch

    with torch.no_grad():
        for p in side_branch(model).parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(path)
    loaded = type(model).from_pretrained(path).eval()
    dpvr_kernels.patch(loaded)
    assert loaded.config.dpvr == model.config.dpvr
    with torch.no_grad():
        assert torch.equal(model(**batch, use_cache=False).logits, loaded(**batch, use_cache=False).logits)
