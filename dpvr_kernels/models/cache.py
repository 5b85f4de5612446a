"""The KV cache under DPVR-LF: layers [r, N-f) hold text tokens only, the other layers every token.

:class:`DPVRCache` is a ``DynamicCache`` that knows this: every public query (``get_seq_length()``,
``get_mask_sizes``, ``get_query_offset``) answers with the stock meaning (the length of the whole sequence,
read off a layer that holds every token) for any route layer, ``crop`` removes decoded tokens from every
layer, and the batch reorderings carry the deep layers' slot mask along. The patched forward adopts a
fresh ``DynamicCache`` into this class, so caches made by ``generate`` or by the user both work.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from ..plan import RoutePlan


class DPVRCache(DynamicCache):
    """A ``DynamicCache`` whose deep layers hold the prompt's text tokens right-aligned in ``W`` slots.

    Attributes set by the prefill: ``dpvr_full_layer`` (a layer that holds every token),
    ``dpvr_text_valid`` (bool ``[B, W]``, which deep-layer prompt slots hold a token) and
    ``dpvr_prefill_len`` (the prompt length ``L``).
    """

    dpvr_full_layer: int = -1
    dpvr_text_valid: Tensor | None = None
    dpvr_prefill_len: int = 0

    @classmethod
    def adopt(cls, cache: DynamicCache, full_layer: int) -> DPVRCache:
        """Turn an empty ``DynamicCache`` into a ``DPVRCache`` in place (the caller keeps the same object)."""
        if not isinstance(cache, cls):
            if type(cache) is not DynamicCache:
                raise NotImplementedError(
                    f"{type(cache).__name__} is not supported under DPVR-LF (its deep layers cache text only); pass "
                    "a DynamicCache or none"
                )
            if cache.get_seq_length() > 0:
                raise RuntimeError(
                    "this cache was not filled by a DPVR-LF prefill: run the prompt through the patched model first "
                    "(model.generate does), or unpatch the model to reuse a stock cache"
                )
            cache.__class__ = cls
        cache.dpvr_full_layer = full_layer
        return cache

    @property
    def dpvr_filled(self) -> bool:
        return self.dpvr_text_valid is not None

    # -- queries with the stock meaning: one sequence length for every layer
    def get_seq_length(self, layer_idx: int | None = None) -> int:
        return super().get_seq_length(self._full_index())

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = None) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._full_index())

    def get_query_offset(self, layer_idx: int | None = None) -> int:
        return self.get_seq_length()

    def _full_index(self) -> int:
        # Layers are created lazily: before the full layer exists, HF reads it as "not yet created" (size 0).
        return max(self.dpvr_full_layer, 0)

    # -- edits that keep the deep layers consistent
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        if tokens_to_remove == 0:
            return
        if self.dpvr_filled and self.get_seq_length() + tokens_to_remove < self.dpvr_prefill_len:
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens from a DPVR-LF cache: only "
                f"{self.get_seq_length() - self.dpvr_prefill_len} were decoded after the prompt, and the deep layers "
                "hold the prompt's text tokens only; run the shorter prompt as a new prefill"
            )
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
        self.dpvr_text_valid, self.dpvr_prefill_len = None, 0


class TextCacheWriter:
    """Cache view for the deep layers in a prefill: stores the packed text K/V per sample.

    The real cache layer gets ``[B, Hkv, W, Dh]`` with each sample's text tokens right-aligned
    (left-padded) in ``W = max text tokens`` slots, so decode steps can append to every sample at once.
    The attention of the prefill itself still sees the packed stream.
    """

    def __init__(self, cache: DPVRCache, plan: RoutePlan):
        self.cache, self.batch_size, self.width = cache, plan.batch_size, plan.max_text_len
        self.slots, cache.dpvr_text_valid = text_cache_layout(plan)
        cache.dpvr_prefill_len = plan.seq_len

    def _pad(self, packed: Tensor) -> Tensor:
        out = packed.new_zeros(packed.shape[1], self.batch_size * self.width, packed.shape[-1])
        out.index_copy_(1, self.slots, packed[0])
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


def deep_decode_mask(cache: DPVRCache, attention_mask: Tensor | None, past: int, q_len: int, batch: int,
                     device: torch.device) -> Tensor:
    """Boolean ``[B, 1, q, K]`` mask of a decode step over a deep layer's text-only cache."""
    text_valid = cache.dpvr_text_valid
    if text_valid is None:
        raise RuntimeError(
            "this cache was not filled by a DPVR-LF prefill: run the prompt through the patched model first "
            "(model.generate does), or unpatch the model to reuse a stock cache"
        )
    decoded = past - cache.dpvr_prefill_len  # tokens decoded before this step
    if attention_mask is not None and attention_mask.dim() == 2:
        new_valid = attention_mask[:, cache.dpvr_prefill_len : past + q_len].bool()
    else:
        new_valid = torch.ones(batch, decoded + q_len, dtype=torch.bool, device=device)
    key_valid = torch.cat([text_valid, new_valid], dim=1)  # [B, W + decoded + q]
    width = text_valid.shape[1]
    key = torch.arange(key_valid.shape[1], device=device)[None, :]
    query = torch.arange(q_len, device=device)[:, None]
    causal = key <= width + decoded + query  # the prompt's text is visible to every new token
    return (key_valid[:, None, None, :] & causal[None, None]).expand(batch, 1, q_len, key_valid.shape[1])


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a live transformers cache (all layers)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total
