"""The plain per-sample DPVR-LF forward: the numerics oracle every fast path is checked against.

No packing, no custom kernels, no varlen attention: for each sample it drops the pad tokens, runs the
model's own decoder layers with explicit boolean causal masks (as additive masks, which every attention
implementation accepts), selects the text and image tokens with ``index_select`` and writes them back
with ``index_copy``. Slow on purpose; it follows DESIGN §2 line by line.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import validate_route
from .models.llava import SIDE_BRANCH, _language_model, _layer_call, stock_attention


def _causal_additive(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _run(layers, lm, hidden: Tensor, positions: Tensor) -> Tensor:
    """Layers on one segment ``[1, n, D]``: causal within it, at the given original positions."""
    if hidden.shape[1] == 0:
        return hidden
    mask = _causal_additive(hidden.shape[1], hidden.dtype, hidden.device)
    pe = lm.rotary_emb(hidden, positions[None])
    for layer in layers:
        hidden = _layer_call(layer, hidden, None, attention_mask=mask, position_embeddings=pe,
                             position_ids=positions[None], use_cache=False)
    return hidden


def _embeddings(model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, vision_mask: Tensor) -> Tensor:
    llava = model.model
    embeds = llava.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    features = llava.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(vision_mask[..., None].expand_as(embeds), features)


def _sequences(positions: Tensor, packed: bool) -> list[Tensor]:
    """Index ranges of the sequences of one row: a new one starts where the position does not follow on."""
    n = positions.numel()
    if not packed or n == 0:
        return [torch.arange(n, device=positions.device)]
    starts = [0] + [i for i in range(1, n) if int(positions[i]) != int(positions[i - 1]) + 1]
    bounds = starts + [n]
    return [torch.arange(a, b, device=positions.device) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def reference_forward(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    route_layer: int | None = None,
    fusion_layers: int = 1,
    side_branch: nn.Module | None = None,
    hidden_only: bool = False,
    packed: bool | None = None,
    vision_mask: Tensor | None = None,
) -> Tensor:
    """DPVR-LF logits ``[B, L, vocab]`` (zeros at pad positions), one sample at a time.

    Uses ``model``'s weights (patched or not). The side branch is ``side_branch``, else the model's
    ``dpvr_side_branch`` if patched, else layer ``route_layer`` itself (what :func:`patch` starts from).
    ``route_layer=None`` takes the patched setting or the default. ``hidden_only`` returns the final
    normed hidden states instead of logits. Differentiable; wrap in ``torch.no_grad()`` for inference.

    Image tokens are the ``config.image_token_id`` tokens of a call with ``pixel_values``; without them
    every token is text (as stock embeds it). ``vision_mask`` (bool ``[B, L]``) names them explicitly, e.g.
    the prompt's image tokens when a generated token carries the image-token id. ``packed``: rows hold several sequences, split wherever
    ``position_ids`` do not follow on, each run as its own sample; ``None`` does so where stock does
    without a cache (``position_ids`` given, no ``attention_mask``).
    """
    lm = _language_model(model)
    n_layers = len(lm.layers)
    saved = getattr(model.config, "dpvr", None)
    if route_layer is None and saved:
        route_layer, fusion_layers = saved["route_layer"], saved["fusion_layers"]
    r, f = validate_route(n_layers, route_layer, fusion_layers)
    if side_branch is None:
        side_branch = getattr(lm, SIDE_BRANCH, None) or lm.layers[r]
    bsz, seq_len = input_ids.shape
    if packed is None:
        packed = attention_mask is None and position_ids is not None
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device)[None]
    position_ids = position_ids.expand(bsz, seq_len)
    if vision_mask is None:
        vision_mask = input_ids == model.config.image_token_id
        if pixel_values is None:
            vision_mask = torch.zeros_like(vision_mask)

    with stock_attention(model):
        embeds = _embeddings(model, input_ids, pixel_values, vision_mask)
        outputs = []
        for b in range(bsz):
            keep = attention_mask[b].bool()
            valid = torch.arange(seq_len, device=input_ids.device)[keep]  # pad tokens play no part
            full = None
            for seq in _sequences(position_ids[b].index_select(0, valid), packed):
                rows = valid.index_select(0, seq)
                out = _one_sequence(model, lm, side_branch, embeds[b].index_select(0, rows)[None],
                                    position_ids[b].index_select(0, rows), vision_mask[b].index_select(0, rows),
                                    r, f, hidden_only)
                if full is None:
                    full = out.new_zeros(seq_len, out.shape[-1])
                full = full.index_copy(0, rows, out[0])
            if full is None:  # a row of pads only
                width = lm.norm.weight.shape[0] if hidden_only else model.lm_head.out_features
                full = embeds.new_zeros(seq_len, width)
            outputs.append(full)
    return torch.stack(outputs)


def _one_sequence(model, lm, side_branch, hidden: Tensor, positions: Tensor, is_image: Tensor, r: int, f: int,
                  hidden_only: bool) -> Tensor:
    """DESIGN §2 for one sequence ``[1, n, D]`` without pads: full layers, route, side branch, fuse."""
    n_layers = len(lm.layers)
    text_idx = torch.arange(is_image.numel(), device=is_image.device)[~is_image]
    image_idx = torch.arange(is_image.numel(), device=is_image.device)[is_image]
    hidden = _run(lm.layers[:r], lm, hidden, positions)
    text = _run(lm.layers[r : n_layers - f], lm, hidden.index_select(1, text_idx), positions.index_select(0, text_idx))
    image = _run([side_branch], lm, hidden.index_select(1, image_idx), positions.index_select(0, image_idx))
    fused = hidden.clone().index_copy(1, text_idx, text).index_copy(1, image_idx, image)
    fused = lm.norm(_run(lm.layers[n_layers - f :], lm, fused, positions))
    return fused if hidden_only else model.lm_head(fused)
