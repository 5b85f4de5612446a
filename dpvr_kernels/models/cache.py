"""The KV cache under DPVR-LF: layers [r, N-f) hold text tokens only, the other layers every token.

:class:`DPVRCache` is a ``DynamicCache`` that knows this: every public query (``get_seq_length()``,
``get_mask_sizes``, ``get_query_offset``) answers with the stock meaning (the length of the whole sequence,
read off a layer that holds every token) for any route layer, ``crop`` removes decoded tokens from every
layer, and the batch reorderings carry the deep layers' slot mask along. The patched forward adopts a
fresh ``DynamicCache`` into this class, so caches made by ``generate`` or by the user both work;
:class:`DPVRStaticCache` is the same over a ``StaticCache``, with a text-only capacity for the deep layers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from ..plan import RoutePlan


class _DPVRCacheMixin:
    """What a cache needs under DPVR-LF, on top of a transformers cache class.

    Attributes set by the patch and the prefill: ``dpvr_full_layer`` (a layer that holds every token),
    ``dpvr_deep_layer`` (the first text-only layer), ``dpvr_text_valid`` (bool ``[B, W]``, which deep-layer
    prompt slots hold a token) and ``dpvr_prefill_len`` (the prompt length ``L``).
    """

    dpvr_full_layer: int = -1
    dpvr_deep_layer: int = 0
    dpvr_text_valid: Tensor | None = None
    dpvr_prefill_len: int = 0
    dpvr_layout: Tensor | None = None
    """int64 ``[2]`` on the device (static caches): the prompt's length ``L`` and text width ``W``. Decode steps
    read them as tensors, so a compiled step does not depend on (or recompile for) the prompt's lengths."""

    @property
    def dpvr_filled(self) -> bool:
        """True once a DPVR-LF prefill has written the prompt (a host-side flag: no device sync)."""
        return self.dpvr_text_valid is not None

    # -- queries with the stock meaning: one sequence length for every layer
    def get_seq_length(self, layer_idx: int | None = None):
        return super().get_seq_length(self._full_index())

    def get_mask_sizes(self, query_length, layer_idx: int | None = None) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._full_index())

    def get_query_offset(self, layer_idx: int | None = None):
        return self.get_seq_length()

    def _full_index(self) -> int:
        # Layers are created lazily: before the full layer exists, HF reads it as "not yet created" (size 0).
        return max(self.dpvr_full_layer, 0)

    # -- edits that keep the deep layers consistent
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:  # generate's per-step call: no device sync
            return
        length = int(self.get_seq_length())
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove -= length
        if self.dpvr_filled and length + tokens_to_remove < self.dpvr_prefill_len:
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens from a DPVR-LF cache: only {length - self.dpvr_prefill_len} "
                "were decoded after the prompt, and the deep layers hold the prompt's text tokens only; run the "
                "shorter prompt as a new prefill"
            )
        if tokens_to_remove:
            super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.dpvr_filled:
            self.dpvr_text_valid = self.dpvr_text_valid.index_select(0, beam_idx.to(self.dpvr_text_valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.dpvr_filled:
            self.dpvr_text_valid = self.dpvr_text_valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.dpvr_filled:
            self.dpvr_text_valid = self.dpvr_text_valid[indices]

    def reset(self) -> None:
        super().reset()
        self.dpvr_text_valid, self.dpvr_prefill_len, self.dpvr_layout = None, 0, None


class DPVRCache(_DPVRCacheMixin, DynamicCache):
    """A ``DynamicCache`` whose deep layers hold the prompt's text tokens right-aligned in ``W`` slots."""


class DPVRStaticCache(_DPVRCacheMixin, StaticCache):
    """A ``StaticCache`` whose deep layers [r, N-f) have a text-only capacity.

    ``max_cache_len`` is the stock capacity (prompt + new tokens) of the layers that hold every token;
    ``text_cache_len`` (longest text stream of the prompt + new tokens) that of the deep layers, which is
    where the KV memory is saved. ``generate(cache_implementation="static")`` builds it under the patch.
    """

    def __init__(self, config, max_cache_len: int, text_cache_len: int, route_layer: int, fusion_layers: int = 1,
                 **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        _unwindowed(self)
        n = len(self.layers)
        for i in range(route_layer, n - fusion_layers):
            if type(self.layers[i]) is not StaticLayer:
                raise NotImplementedError(f"{type(self.layers[i]).__name__} layers are not supported under DPVR-LF")
            self.layers[i] = StaticLayer(max_cache_len=text_cache_len)
        self.dpvr_full_layer, self.dpvr_deep_layer = n - 1, route_layer


def _unwindowed(cache) -> None:
    """Sliding-window layers of an empty cache become plain layers: a rolling buffer over the text-only stream
    would drop keys by count, not by original position. The window is applied by the masks instead, and the
    patched forward refuses a step where it would bind with a cache; a static cache longer than the window is
    refused here."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            cache.layers[i] = DynamicLayer()
        elif isinstance(layer, StaticSlidingWindowLayer):
            if not getattr(layer, "_is_croppable", False):  # transformers: capacity <= window
                raise NotImplementedError(
                    f"a static cache longer than the model's sliding window (holding {layer.max_cache_len} of its "
                    "tokens) is not supported under DPVR-LF: its text-only layers cannot roll a window over original "
                    "positions. Keep prompt + max_new_tokens within the window, or call dpvr_kernels.unpatch(model)"
                )
            cache.layers[i] = StaticLayer(max_cache_len=layer.max_cache_len)


def adopt_cache(cache, full_layer: int, deep_layer: int):
    """Turn an empty ``DynamicCache``/``StaticCache`` into its DPVR-LF class in place (the caller keeps the same
    object); a cache of another class, or one a stock forward filled, is refused."""
    if not isinstance(cache, _DPVRCacheMixin):
        target = {DynamicCache: DPVRCache, StaticCache: DPVRStaticCache}.get(type(cache))
        if target is None:
            raise NotImplementedError(
                f"{type(cache).__name__} is not supported under DPVR-LF (its deep layers cache text only); pass a "
                "DynamicCache or StaticCache, none, or generate(..., cache_implementation='static')"
            )
        if int(cache.get_seq_length()) > 0:
            raise RuntimeError(
                "this cache was not filled by a DPVR-LF prefill: run the prompt through the patched model first "
                "(model.generate does), or unpatch the model to reuse a stock cache"
            )
        cache.__class__ = target
    if cache.dpvr_full_layer < 0:  # set once, not on every decode step
        _unwindowed(cache)
        cache.dpvr_full_layer, cache.dpvr_deep_layer = full_layer, deep_layer
    return cache


def is_dpvr_cache(cache) -> bool:
    return isinstance(cache, _DPVRCacheMixin)


class TextCacheWriter:
    """Cache view for the deep layers in a prefill: stores the packed text K/V per sample.

    The real cache layer gets ``[B, Hkv, W, Dh]`` with each sample's text tokens right-aligned
    (left-padded) in ``W = max text tokens`` slots, so decode steps can append to every sample at once.
    The attention of the prefill itself still sees the packed stream.
    """

    def __init__(self, cache: DPVRCache, plan: RoutePlan):
        self.cache, self.batch_size, self.width = cache, plan.batch_size, plan.max_text_len
        self.slots, valid = text_cache_layout(plan)
        if isinstance(cache, DPVRStaticCache):  # validity over the layer's whole capacity: fixed shapes
            capacity = cache.layers[cache.dpvr_deep_layer].max_cache_len
            valid = torch.nn.functional.pad(valid, (0, capacity - valid.shape[1]))
            cache.dpvr_layout = torch.tensor([plan.seq_len, self.width], device=plan.device)
        cache.dpvr_text_valid = valid
        cache.dpvr_prefill_len = plan.seq_len

    def _pad(self, packed: Tensor) -> Tensor:
        out = packed.new_zeros(packed.shape[1], self.batch_size * self.width, packed.shape[-1])
        out.index_copy_(1, self.slots.to(out.device), packed[0])  # device_map: layers on several devices
        return out.view(packed.shape[1], self.batch_size, self.width, packed.shape[-1]).transpose(0, 1)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        self.cache.update(self._pad(key_states), self._pad(value_states), layer_idx, *args, **kwargs)
        return key_states, value_states

    def fill_empty(self, layer_idx: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> None:
        """A deep layer of a batch without text tokens: cache zero prompt slots, so decode steps can append."""
        empty = torch.empty(self.batch_size, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.cache.update(empty, empty.clone(), layer_idx)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def text_cache_layout(plan: RoutePlan) -> tuple[Tensor, Tensor]:
    """Slots of the packed text tokens in the ``[B, W]`` right-aligned cache layout, and its validity mask."""
    if plan.packed:
        raise ValueError("a KV cache cannot hold padding-free packed rows; run packed rows with use_cache=False")
    width = plan.max_text_len
    starts = plan.text_cu_seqlens.long()
    counts = starts[1:] - starts[:-1]
    sample = plan.text_index // plan.seq_len
    rank = torch.arange(plan.num_text, device=plan.device) - starts[sample]
    slots = sample * width + (width - counts[sample]) + rank
    valid = torch.arange(width, device=plan.device)[None, :] >= (width - counts)[:, None]
    return slots, valid


def deep_decode_mask(cache, attention_mask: Tensor | None, q_len: int, batch: int, device: torch.device) -> Tensor:
    """Boolean ``[B, 1, q, K]`` mask of a decode step over a deep layer's text-only cache.

    Key slots: the prompt's ``W`` right-aligned text slots (``dpvr_text_valid``), then one slot per token fed
    after the prompt. ``K`` is what the layer returns after this step's update: the filled length (dynamic)
    or its capacity (static). No device-to-host sync: the filled length of a static layer stays a tensor.
    """
    text_valid = cache.dpvr_text_valid  # set: the forward takes the decode path only for a filled cache
    layer = cache.layers[cache.dpvr_deep_layer]
    filled = layer.get_seq_length()  # W + tokens decoded before this step (an int, or a tensor if static)
    capacity = layer.get_max_length()
    if capacity > 0:
        return _static_deep_decode_mask(cache, text_valid, filled, capacity, attention_mask, q_len, batch, device)
    width = filled + q_len
    prompt_slots = text_valid.shape[1]
    new_slots = width - prompt_slots
    if attention_mask is not None and attention_mask.dim() == 2:
        new_valid = attention_mask[:, cache.dpvr_prefill_len :].bool()[:, :new_slots]
        if new_valid.shape[1] < new_slots:  # a static layer's unused capacity
            new_valid = torch.nn.functional.pad(new_valid, (0, new_slots - new_valid.shape[1]))
    else:
        new_valid = torch.ones(batch, new_slots, dtype=torch.bool, device=device)
    key_valid = torch.cat([text_valid.to(device), new_valid.to(device)], dim=1)  # [B, K]
    key = torch.arange(width, device=device)[None, :]
    query = torch.arange(q_len, device=device)[:, None]
    causal = key <= filled + query  # the prompt's text is visible to every new token
    return (key_valid[:, None, None, :] & causal[None, None]).expand(batch, 1, q_len, width)


def _static_deep_decode_mask(cache, text_valid: Tensor, filled, capacity: int, attention_mask: Tensor | None,
                             q_len: int, batch: int, device: torch.device) -> Tensor:
    """:func:`deep_decode_mask` over a static deep layer, with shapes fixed by its capacity and the prompt's
    lengths read as tensors: one compiled decode step serves every prompt and ``max_new_tokens`` that fit."""
    slot = torch.arange(capacity, device=device)
    prefill_len, width = cache.dpvr_layout.to(device).unbind(0)
    fed = slot >= width  # slots of tokens fed after the prompt
    if attention_mask is not None and attention_mask.dim() == 2:
        column = (prefill_len + slot - width).clamp(0, attention_mask.shape[1] - 1)
        new_valid = attention_mask.bool().gather(1, column.expand(attention_mask.shape[0], -1)) & fed
    else:
        new_valid = fed.expand(batch, -1)
    key_valid = text_valid.to(device) | new_valid  # [B, K]
    causal = slot[None, :] <= filled + torch.arange(q_len, device=device)[:, None]
    return (key_valid[:, None, None, :] & causal[None, None]).expand(batch, 1, q_len, capacity)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a live transformers cache (all layers)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total
