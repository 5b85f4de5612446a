"""The DPVR-LF forward: the decoder forward bound onto ``model.model.language_model``, and the multimodal
wrapper's forward (``model.model``) that finds the vision tokens of a call.

Data flow of a prefill (``docs/CONTRACT.md``, "Data flow")::

    embeds ─ layers[0, r) ─ route_split ─ text  ─ layers[r, N-f) (varlen) ─┐
                                     └─ vision ─ side branch (varlen)   ─ fuse_merge ─ layers[N-f, N) ─ norm

Decode steps carry text tokens only: layers [r, N-f) attend over their text-only cache with a mask.
A token is routed as vision (image or video) only where the call carries vision features for it
(``pixel_values``, ``pixel_values_videos``), as stock embeds it; in a call without them (every decode step) a
placeholder id is an ordinary token. Sliding-window backbones keep their window over original positions
everywhere (contract rule 6; ``attention.py``).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..ops import fuse_merge, route_split
from ..plan import build_route_plan_from_mask, packed_sequence_ids, sequence_ids_from_cu_seqlens
from ..vision_tokens import tokens_per_image
from . import classes, distributed, positions
from .attention import VarlenSegments
from .backbone import (
    CACHE_KW,
    MASK_TAKES_LAYER_IDX,
    SIDE_BRANCH,
    VISION_MASK_KW,
    PatchState,
    layer_call,
    wrapper_state,
)
from .cache import DPVRCache, TextCacheWriter, adopt_cache, deep_decode_mask, is_dpvr_cache
from .outputs import LayerTrace, start_trace, weights_kwargs

__all__ = ["add_deepstack", "dpvr_language_forward", "vision_wrapper_forward"]


def _full_masks(lm, inputs_embeds: Tensor, attention_mask: Tensor | None, cache, position_ids: Tensor) -> dict:
    """The stock masks of the layers that see every token, per attention type (as the stock decoder makes them)."""
    kw = {"config": lm.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
          CACHE_KW: cache, "position_ids": position_ids}
    if MASK_TAKES_LAYER_IDX:
        kw["layer_idx"] = len(lm.layers) - 1  # a fusion layer: its cache holds every token
    masks = {"full_attention": create_causal_mask(**kw)}
    if lm._dpvr_state.window is not None:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return masks


def _window_error(span: int, window: int) -> ValueError:
    return ValueError(
        f"the sliding window ({window} positions) binds in this batch (positions span {span}), and DPVR-LF's "
        "text-only KV cache cannot apply a window over original positions. Run this batch without a cache "
        "(use_cache=False; the prefill is exact with the window), keep prompt + new tokens within the window, "
        "or call dpvr_kernels.unpatch(model)"
    )


def _route_forward(lm, hidden: Tensor, vision_mask: Tensor, attention_mask, position_ids: Tensor, sequence_ids,
                   cache: DPVRCache | None, use_cache: bool, layer_kwargs: dict, trace: LayerTrace) -> Tensor:
    """Prefill of layers [r, N-f): route, run the text stream and the side branch, fuse. ``position_ids`` are the
    rotary positions (``[B|1, L]``, or ``[3, B|1, L]`` M-RoPE rows), gathered per token into each stream. ``trace``
    records the deep layers' states and weights where the call asks for them."""
    state: PatchState = lm._dpvr_state
    r, f = state.settings.route_layer, state.settings.fusion_layers
    backend = state.settings.backend
    # Under a device_map the route layer's output may sit on another device than the masks: route there.
    vision_mask, attention_mask, position_ids, sequence_ids = distributed.to_device(
        hidden.device, vision_mask, attention_mask, position_ids, sequence_ids)
    plan = build_route_plan_from_mask(vision_mask, attention_mask, position_ids, sequence_ids)
    if cache is not None and state.window is not None and plan.position_span >= state.window:
        raise _window_error(plan.position_span, state.window)
    text, vision = route_split(hidden, plan, backend=backend)
    deep = range(r, len(lm.layers) - f)
    text_cache = TextCacheWriter(cache, plan) if cache is not None else None

    if plan.num_text:
        segments = VarlenSegments(plan.text_cu_seqlens, plan.text_seqlens, plan.max_text_len,
                                  positions.order_row(plan.text_position_ids), plan.position_span)
        text = text[None]
        pe = lm.rotary_emb(text, positions.rope_input(plan.text_position_ids))
        text_pos = positions.stream_layer_positions(plan.text_position_ids)
        for i in deep:
            text = layer_call(lm.layers[i], text, text_cache, attention_mask=None, position_embeddings=pe,
                              position_ids=text_pos, use_cache=use_cache, dpvr_segments=segments,
                              **weights_kwargs(trace), **layer_kwargs)
            if trace.wants(i + 1):  # only when asked: nothing extra on the hot path
                trace.record_deep_text(i, text[0].to(hidden.device))
        text = text[0].to(hidden.device)  # a device_map may have put the last deep layer elsewhere
    elif text_cache is not None:
        # No text token in the batch (prompts of vision tokens only): the deep layers have nothing to run, but their
        # cache must exist (with zero prompt slots) for the decode steps to append to.
        cfg = lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for i in deep:
            heads = distributed.local_kv_heads(lm.layers[i], cfg.num_key_value_heads, head_dim)
            text_cache.fill_empty(i, heads, head_dim, hidden.dtype, hidden.device)

    if plan.num_vision:
        segments = VarlenSegments(plan.vision_cu_seqlens, plan.vision_seqlens, plan.max_vision_len,
                                  positions.order_row(plan.vision_position_ids), plan.position_span)
        vision = vision[None]
        pe = lm.rotary_emb(vision, positions.rope_input(plan.vision_position_ids))
        vision = layer_call(getattr(lm, SIDE_BRANCH), vision, None, attention_mask=None, position_embeddings=pe,
                            position_ids=positions.stream_layer_positions(plan.vision_position_ids),
                            use_cache=False, dpvr_segments=segments, **layer_kwargs)[0]
    if trace.active:
        trace.fuse_deep(functools.partial(fuse_merge, backend=backend), vision, hidden, plan)
        trace.scatter_deep_weights(deep, plan)
    return fuse_merge(text, vision, hidden, plan, backend=backend)


def _prefill_sequence_ids(attention_mask: Tensor | None, position_ids: Tensor | None, cache, batch: int,
                          q_len: int, kwargs: dict) -> Tensor | None:
    """Sequences of padding-free packed rows, where stock keeps them apart; None for one sequence per row.

    Stock separates packed sequences when flash-attn's ``cu_seq_lens_q`` is passed, or (its masks) when
    ``position_ids`` restart inside a row and neither a 2-D attention mask nor a cache is used.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        if cache is not None or batch != 1:
            raise ValueError(
                "padding-free packed rows (cu_seq_lens_q) are routed per sequence, which needs one row (B=1) and "
                "no KV cache: call the model with use_cache=False, as DataCollatorWithFlattening training does"
            )
        return sequence_ids_from_cu_seqlens(cu_seqlens, q_len)
    if attention_mask is None and cache is None and position_ids is not None:
        return packed_sequence_ids(position_ids.expand(batch, q_len))
    return None


def dpvr_language_forward(
    self,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """The decoder forward under DPVR-LF (bound onto ``model.model.language_model`` by :func:`patch`)."""
    state: PatchState = self._dpvr_state
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    trace = start_trace(self, kwargs, state.user_attn)  # output_hidden_states / output_attentions (outputs.py)
    try:
        return _decoder_forward(self, state, trace, cache, input_ids, attention_mask, position_ids, inputs_embeds,
                                use_cache, kwargs)
    finally:
        trace.close()


def _decoder_forward(self, state: PatchState, trace: LayerTrace, cache, input_ids, attention_mask, position_ids,
                     inputs_embeds, use_cache, kwargs: dict) -> BaseModelOutputWithPast:
    kwargs.pop("return_dict", None)
    vision_mask = kwargs.pop(VISION_MASK_KW, None)  # None: no vision features in this call, every token is text
    # Qwen3-VL's deepstack: features added to the vision tokens' states after the first layers (all below r).
    deepstack_mask, deepstack = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"DPVR-LF needs a 2-D attention_mask [B, L] (1 = token, 0 = pad) to route tokens; got "
            f"{attention_mask.dim()}-D. Pass the tokenizer's mask instead of a prepared 4-D mask."
        )

    if use_cache is None:
        use_cache = self.config.use_cache
    num_layers = len(self.layers)
    r, f = state.settings.route_layer, state.settings.fusion_layers
    if use_cache and cache is None:
        cache = DPVRCache(config=self.config)
    if cache is not None:
        cache = adopt_cache(cache, full_layer=num_layers - 1, deep_layer=r)
    batch, q_len = inputs_embeds.shape[:2]
    # Prefill or decode step is host-side state of the cache: no device sync, no branch on tensor values.
    prefill = cache is None or not cache.dpvr_filled
    past = cache.get_seq_length() if cache is not None else 0  # an int, or a tensor for a static cache
    pos = positions.call_positions(state.model_class.positions, position_ids, batch, q_len, past,
                                   inputs_embeds.device)

    if not prefill and state.window is not None and isinstance(past, int) and past + q_len > state.window:
        raise _window_error(past + q_len - 1, state.window)
    masks = _full_masks(self, inputs_embeds, attention_mask, cache, pos.stock)
    pe = self.rotary_emb(inputs_embeds, pos.rope)
    common = dict(position_embeddings=pe, position_ids=pos.stock, use_cache=use_cache, **kwargs)
    if deepstack is not None and len(deepstack) > r:
        raise ValueError(f"{len(deepstack)} deepstack injections reach layer {r}, the route layer: patch with "
                         f"route_layer >= {len(deepstack)}")
    hidden = inputs_embeds
    trace.record(0, hidden)
    for i in range(r):
        hidden = layer_call(self.layers[i], hidden, cache, attention_mask=masks[state.layer_types[i]], **common)
        trace.record(i + 1, hidden)  # the layer's output, before a deepstack injection (as stock records it)
        if deepstack is not None and i < len(deepstack):
            hidden = add_deepstack(hidden, deepstack_mask, deepstack[i])

    if prefill:
        if vision_mask is None:
            vision_mask = torch.zeros(batch, q_len, dtype=torch.bool, device=inputs_embeds.device)
        sequence_ids = _prefill_sequence_ids(attention_mask, pos.explicit, cache, batch, q_len, kwargs)
        hidden = _route_forward(self, hidden, vision_mask, attention_mask, pos.rope, sequence_ids, cache,
                                use_cache, kwargs, trace)
    else:
        deep_mask = deep_decode_mask(cache, attention_mask, q_len, batch, inputs_embeds.device)
        for i in range(r, num_layers - f):
            hidden = layer_call(self.layers[i], hidden, cache, attention_mask=deep_mask, **weights_kwargs(trace),
                                **common)
            trace.record(i + 1, hidden)

    for i in range(num_layers - f, num_layers):
        hidden = layer_call(self.layers[i], hidden, cache, attention_mask=masks[state.layer_types[i]], **common)
        trace.record(i + 1, hidden)
    hidden = self.norm(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_KW: cache}, **trace.finish(hidden))


def add_deepstack(hidden: Tensor, mask: Tensor, features: Tensor) -> Tensor:
    """``hidden`` with ``features`` added at the rows of ``mask`` (bool ``[B, L]``), as Qwen3-VL's decoder adds its
    deepstack features after each of its first layers."""
    mask = mask.to(hidden.device)
    out = hidden.clone()
    out[mask] = hidden[mask] + features.to(hidden.device, hidden.dtype)
    return out


@functools.cache
def _forward_params(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s parameters after ``self`` and ``input_ids`` (what positional args bind to)."""
    return tuple(inspect.signature(cls.forward).parameters)[2:]


def vision_wrapper_forward(self, input_ids: Tensor | None = None, *args, **kwargs):
    """The multimodal wrapper's forward (``model.model``): finds the vision tokens of a call that carries vision
    features (images, videos) and hands them to the language model; names the fix when their count is wrong."""
    state: PatchState = wrapper_state(self)
    if args:  # by name from here on: the classes put their pixel inputs at different positions
        kwargs = {**dict(zip(_forward_params(type(self)), args, strict=False)), **kwargs}
        args = ()
    carried = classes.carried_inputs(state.model_class, kwargs)
    if not carried:
        # No vision features: stock embeds placeholder ids as text, and so does DPVR-LF (decode steps).
        return type(self).forward(self, input_ids, *args, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and (cache.dpvr_filled if is_dpvr_cache(cache) else int(cache.get_seq_length()) > 0):
        raise ValueError(
            f"{carried[0].kind}s in a decode step: {carried[0].pixels} were passed with a cache that already holds "
            "tokens. DPVR-LF routes vision tokens only in the prefill (the deep layers cache text only): put every "
            f"{carried[0].kind} in the prompt, drop {carried[0].pixels} when continuing from a cache, or run this "
            "input as a new prefill without a cache."
        )
    mask = classes.vision_mask(self, carried, input_ids, kwargs.get("inputs_embeds"))
    try:
        return type(self).forward(self, input_ids, *args, **kwargs, **{VISION_MASK_KW: mask})
    except ValueError as err:
        # The stock count check runs on device (no extra host sync here); name the fix when it fires.
        kind = next((v for v in carried if f"{v.kind} features and {v.kind} tokens do not match" in str(err).lower()),
                    None)
        if kind is None:
            raise
        token = getattr(self.config, kind.token_id)
        if kind.kind == "image" and type(self).__name__ in ("LlavaModel", "VipLlavaModel"):
            need = f"exactly {tokens_per_image(self.config)} image tokens per image in pixel_values"
        else:
            need = f"as many {kind.kind} tokens per {kind.kind} as its features (they depend on its size/frames)"
        raise ValueError(
            f"{err}. The prompt must hold {need} (config.{kind.token_id}={token}); the model's processor "
            "inserts them: build inputs with processor(text=..., images=..., videos=...)"
        ) from err
