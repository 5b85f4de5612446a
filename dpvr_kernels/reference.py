"""The plain per-sample DPVR-LF forward: the numerics oracle every fast path is checked against.

No packing, no custom kernels, no varlen attention: for each sample it drops the pad tokens, runs the
model's own decoder layers with explicit boolean causal masks (as additive masks, which every attention
implementation accepts), selects the text and vision tokens with ``index_select`` and writes them back
with ``index_copy``. Slow on purpose; it follows docs/CONTRACT.md line by line.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import validate_route
from .models import classes
from .models.backbone import SIDE_BRANCH, attention_layer_types, language_model, layer_call
from .models.patching import stock_attention
from .models.positions import ROPE, call_positions, order_row, rope_input, stream_layer_positions


def _mask_additive(positions: Tensor, window: int | None, dtype: torch.dtype) -> Tensor:
    """Causal (by sequence order, as stock), and for a sliding-window layer within ``window`` original positions."""
    n = positions.numel()
    allowed = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
    if window is not None:
        allowed &= (positions[:, None] - positions[None, :]) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _run(layers, windows, lm, hidden: Tensor, positions: Tensor, states: list | None = None) -> Tensor:
    """Layers on one segment ``[1, n, D]`` at the given original positions (``[n]``, or ``[3, n]`` M-RoPE rows;
    ``windows``: each layer's window). ``states`` gets each layer's output."""
    if hidden.shape[1] == 0:
        if states is not None:
            states.extend(hidden for _ in layers)
        return hidden
    pe = lm.rotary_emb(hidden, rope_input(positions))
    for layer, window in zip(layers, windows, strict=True):
        mask = _mask_additive(order_row(positions), window, hidden.dtype)
        hidden = layer_call(layer, hidden, None, attention_mask=mask, position_embeddings=pe,
                            position_ids=stream_layer_positions(positions), use_cache=False)
        if states is not None:
            states.append(hidden)
    return hidden


class _Embedded(Exception):
    pass


def _stock_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, vision_inputs: dict,
                  vision_mask: Tensor, want_positions: bool) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """The decoder's input embeddings, (``want_positions``) its ``position_ids`` and its deepstack injections, as
    the stock multimodal forward makes them (vision features scattered into the placeholders, M-RoPE positions
    from the model's own ``get_rope_index``): captured at the language model's input. Placeholder ids that
    ``vision_mask`` calls text (e.g. generated ones) keep their plain embedding. Each injection is ``[B, L, D]``,
    zero but at the vision tokens."""
    llava = model.model
    plain = llava.get_input_embeddings()(input_ids)
    if not vision_inputs and not want_positions:
        return plain, None, []
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)
        raise _Embedded

    row = classes.model_class(model)
    ids = input_ids.clone()
    hidden = torch.zeros_like(vision_mask)
    for vision in row.inputs:  # stock would count text-role placeholders as vision tokens: hide them from it
        token = getattr(model.config, vision.token_id)
        hidden |= (input_ids == token) & ~vision_mask
    ids[hidden] = 0 if 0 not in [getattr(model.config, v.token_id) for v in row.inputs] else 1
    handle = language_model(model).register_forward_pre_hook(capture, with_kwargs=True)
    rope_deltas = getattr(llava, "rope_deltas", None)  # M-RoPE wrappers keep it for decode steps: leave it be
    try:
        type(llava).forward(llava, input_ids=ids, attention_mask=attention_mask, use_cache=False, **vision_inputs)
    except _Embedded:
        pass
    finally:
        handle.remove()
        if hasattr(llava, "rope_deltas"):
            llava.rope_deltas = rope_deltas
    injections = []
    for features in captured.get("deepstack_visual_embeds") or ():
        dense = plain.new_zeros(plain.shape)
        dense[captured["visual_pos_masks"].to(plain.device)] = features.to(plain.dtype)
        injections.append(dense)
    # Stock's embeddings everywhere (vision features, and e.g. Ovis2's indicator tokens), but the hidden
    # text-role placeholders keep the plain embedding of their own id.
    return torch.where(hidden[..., None], plain, captured["inputs_embeds"]), captured.get("position_ids"), injections


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
    output_hidden_states: bool = False,
    **vision_inputs,
) -> Tensor | tuple[Tensor, tuple[Tensor, ...]]:
    """DPVR-LF logits ``[B, L, vocab]`` (zeros at pad positions), one sample at a time.

    Uses ``model``'s weights (patched or not). The side branch is ``side_branch``, else the model's
    ``dpvr_side_branch`` if patched, else layer ``route_layer`` itself (what :func:`patch` starts from).
    ``route_layer=None`` takes the patched setting or the default. ``hidden_only`` returns the final
    normed hidden states instead of logits. Differentiable; wrap in ``torch.no_grad()`` for inference.

    Vision tokens are the placeholders (``config.image_token_id``, ``video_token_id``) of the inputs the call
    carries (``pixel_values``, and in ``vision_inputs`` e.g. ``image_sizes``, ``pixel_values_videos``, passed to
    the stock forward as they are); without them every token is text (as stock embeds it). ``vision_mask``
    (bool ``[B, L]``) names them explicitly, e.g. the prompt's image tokens when a generated token carries the
    image-token id. ``packed``: rows hold several sequences, split wherever ``position_ids`` do not follow on,
    each run as its own sample; ``None`` does so where stock does without a cache (``position_ids`` given, no
    ``attention_mask``). Sliding-window layers attend within their window of original positions.

    ``output_hidden_states`` also returns the ``N + 1`` per-layer states ``[B, L, D]`` of docs/CONTRACT.md rule 9
    (the input, each layer's output, the last normed; after a deep layer a text token holds the text stream's
    state and a vision token the side branch's output; zeros at pad positions): ``(logits, hidden_states)``.
    """
    lm = language_model(model)
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
    if pixel_values is not None:
        vision_inputs["pixel_values"] = pixel_values
    if vision_mask is None:
        carried = classes.carried_inputs(classes.model_class(model), vision_inputs)
        vision_mask = (classes.vision_mask(model.model, carried, input_ids, None) if carried
                       else torch.zeros_like(input_ids, dtype=torch.bool))
    types, window = attention_layer_types(lm)
    windows = [window if t == "sliding_attention" else None for t in types]
    scheme = classes.model_class(model).positions

    with stock_attention(model):
        embeds, stock_positions, injections = _stock_inputs(
            model, input_ids, attention_mask, vision_inputs, vision_mask,
            want_positions=scheme != ROPE and position_ids is None)
        pos = call_positions(scheme, position_ids if position_ids is not None else stock_positions, bsz,
                                       seq_len, 0, input_ids.device)
        rope = pos.rope.expand(*pos.rope.shape[:-2], bsz, seq_len)  # [B, L] or [3, B, L]
        order = rope if rope.dim() == 2 else (pos.explicit.expand(bsz, seq_len) if pos.explicit is not None
                                              else rope[0])
        outputs, layer_states = [], []
        for b in range(bsz):
            keep = attention_mask[b].bool()
            valid = torch.arange(seq_len, device=input_ids.device)[keep]  # pad tokens play no part
            full = None
            sample_states = [embeds.new_zeros(seq_len, embeds.shape[-1]) for _ in range(n_layers + 1)]
            for seq in _sequences(order[b].index_select(0, valid), packed):
                rows = valid.index_select(0, seq)
                states: list[Tensor] = []
                out = _one_sequence(model, lm, side_branch, windows, embeds[b].index_select(0, rows)[None],
                                    rope[..., b, :].index_select(-1, rows), vision_mask[b].index_select(0, rows),
                                    r, f, hidden_only, [x[b].index_select(0, rows)[None] for x in injections],
                                    states)
                if full is None:
                    full = out.new_zeros(seq_len, out.shape[-1])
                full = full.index_copy(0, rows, out[0])
                sample_states = [whole.index_copy(0, rows, part[0]) for whole, part in zip(sample_states, states,
                                                                                            strict=True)]
            if full is None:  # a row of pads only
                width = lm.norm.weight.shape[0] if hidden_only else model.lm_head.out_features
                full = embeds.new_zeros(seq_len, width)
            outputs.append(full)
            layer_states.append(sample_states)
    logits = torch.stack(outputs)
    if not output_hidden_states:
        return logits
    return logits, tuple(torch.stack([sample[i] for sample in layer_states]) for i in range(n_layers + 1))


def _one_sequence(model, lm, side_branch, windows: list, hidden: Tensor, positions: Tensor, is_vision: Tensor, r: int,
                  f: int, hidden_only: bool, injections: list[Tensor], states: list[Tensor]) -> Tensor:
    """docs/CONTRACT.md for one sequence ``[1, n, D]`` without pads: full layers (each followed by its deepstack
    injection, if any), route, side branch, fuse. ``states`` gets the ``N + 1`` per-layer states (rule 9)."""
    n = len(lm.layers)
    if len(injections) > r:
        raise ValueError(f"{len(injections)} deepstack injections reach the route layer {r}")
    text_idx = torch.arange(is_vision.numel(), device=is_vision.device)[~is_vision]
    vision_idx = torch.arange(is_vision.numel(), device=is_vision.device)[is_vision]
    states.append(hidden)
    for i in range(r):
        hidden = _run(lm.layers[i : i + 1], windows[i : i + 1], lm, hidden, positions, states)
        if i < len(injections):
            hidden = hidden + injections[i]
    deep_text: list[Tensor] = []
    text = _run(lm.layers[r : n - f], windows[r : n - f], lm, hidden.index_select(1, text_idx),
                positions.index_select(-1, text_idx), deep_text)
    vision = _run([side_branch], [windows[r]], lm, hidden.index_select(1, vision_idx),
                  positions.index_select(-1, vision_idx))
    # After each deep layer: the text stream at text tokens, the side branch's output at vision tokens.
    states.extend(hidden.clone().index_copy(1, text_idx, t).index_copy(1, vision_idx, vision) for t in deep_text)
    fused = hidden.clone().index_copy(1, text_idx, text).index_copy(1, vision_idx, vision)
    fused = _run(lm.layers[n - f :], windows[n - f :], lm, fused, positions, states)
    fused = lm.norm(fused)
    states[-1] = fused
    return fused if hidden_only else model.lm_head(fused)
