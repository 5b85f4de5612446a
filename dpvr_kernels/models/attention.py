"""Varlen attention for the packed text stream and the side branch.

The stock decoder layers run unchanged on packed ``[1, T, D]`` input; the patch points their attention
modules at ``"dpvr_varlen"``, registered with transformers' ``AttentionInterface``. With a
:class:`VarlenSegments` in the kwargs (prefill) it attends causally within each sample's segment, by
the first of: flash-attn ``flash_attn_varlen_func``, torch ``varlen_attn`` (CUDA), SDPA per segment.
Without one (decode steps of the deep layers) it is SDPA with the explicit mask the patched forward
builds for the text-only cache.

Sliding-window layers (the stock attention modules pass ``sliding_window``) keep the window over the tokens'
original positions (docs/CONTRACT.md rule 6): a key is visible when ``position(q) - position(k) < window``.
Where no two tokens of the batch are that far apart (``position_span < window``) it is plain causal attention;
where they are, each segment gets an explicit mask by position (the text stream has gaps where the image tokens
were, so a window over packed indices would be wrong).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

ATTN_NAME = "dpvr_varlen"


@dataclass(frozen=True)
class VarlenSegments:
    """Segments of a packed stream: ``cu_seqlens`` (int32, device) and the same lengths on the host."""

    cu_seqlens: Tensor
    seqlens: tuple[int, ...]
    max_seqlen: int
    positions: Tensor | None = None
    """int64 [T]: original position of each packed token (for sliding windows)."""
    position_span: int = 0
    """Largest position difference between two valid tokens of the batch (host int; 0 if unknown)."""

    def window_binds(self, window: int | None) -> bool:
        """Whether a sliding window of this size masks any key a plain causal mask would show."""
        return window is not None and self.position_span >= window


@functools.cache
def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _torch_varlen_attention(q: Tensor, k: Tensor, v: Tensor, seg: VarlenSegments, scale: float) -> Tensor | None:
    """torch's ``varlen_attn`` on ``[H, T, Dh]`` q and ``[Hkv, T, Dh]`` k/v -> ``[T, H, Dh]``, or None when this
    torch's ``varlen_attn`` cannot express the call (its keyword arguments changed across releases: causal
    masking is ``is_causal`` in early ones and ``window_size=(-1, 0)`` later; ``enable_gqa`` is missing in
    torch 2.11, where the KV heads are expanded here instead)."""
    fn = _torch_varlen()
    params = _varlen_params(fn)
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        return None
    if q.shape[0] != k.shape[0]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
            v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
    return fn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), seg.cu_seqlens, seg.cu_seqlens,
              seg.max_seqlen, seg.max_seqlen, **kwargs)


def varlen_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which varlen path runs for tensors of this device and dtype."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and _flash_attn_varlen() is not None:
        return "flash_attn"
    if device.type == "cuda" and half and _torch_varlen() is not None:
        return "torch_varlen"
    return "sdpa_per_segment"


def _segment_mask(n: int, window: int | None, positions: Tensor | None, device: torch.device | None = None) -> Tensor:
    """bool ``[n, n]``: causal within a segment, and within ``window`` original positions when one is given."""
    device = positions.device if positions is not None else device
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if window is not None:
        mask &= positions[:, None] - positions[None, :] < window
    return mask


def _weighted(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, dropout: float,
              training: bool) -> tuple[Tensor, Tensor]:
    """Attention with explicit weights (what eager attention computes): ``q`` ``[..., H, q, Dh]``, ``k``/``v``
    ``[..., Hkv, k, Dh]``, ``allowed`` bool broadcast to ``[..., H, q, k]``; returns (output ``[..., H, q, Dh]``,
    weights ``[..., H, q, k]``). A fully masked row (a pad query) gets zero weights."""
    if q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return weights @ v, weights


def segment_weights_attention(q: Tensor, k: Tensor, v: Tensor, seg: VarlenSegments, scale: float, *,
                              dropout: float = 0.0, training: bool = False,
                              window: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`attend_segments` with explicit weights, for ``output_attentions`` under eager attention: output
    ``[T, H, Dh]`` and block-diagonal weights ``[H, T, T]`` (zero between segments)."""
    T = q.shape[1]
    out = q.new_zeros(q.shape)
    weights = q.new_zeros(q.shape[0], T, T)
    window = window if seg.window_binds(window) else None
    start = 0
    for n in seg.seqlens:
        if n:
            sl = slice(start, start + n)
            pos = None if seg.positions is None else seg.positions[sl]
            o, w = _weighted(q[:, sl], k[:, sl], v[:, sl], _segment_mask(n, window, pos, q.device), scale, dropout,
                             training)
            out[:, sl] = o
            weights[:, sl, sl] = w
        start += n
    return out.transpose(0, 1), weights


def attend_segments(q: Tensor, k: Tensor, v: Tensor, seqlens: tuple[int, ...] | list[int], scale: float, *,
                    dropout: float = 0.0, window: int | None = None, positions: Tensor | None = None) -> Tensor:
    """Causal attention within each segment of a packed stream, SDPA per segment: the one place the CPU and
    fallback paths (here and in the vLLM plugin's side branch) compute it.

    ``q`` ``[H, T, Dh]``, ``k``/``v`` ``[Hkv, T, Dh]`` (GQA allowed), ``seqlens`` the segment lengths (zeros
    allowed) summing to ``T``; returns ``[T, H, Dh]``. With ``window`` (and ``positions``, int ``[T]``, the
    tokens' original positions) a key is visible when it is not after the query in the stream and
    ``position(q) - position(k) < window`` (contract rule 6).
    """
    gqa = q.shape[0] != k.shape[0]
    outs, start = [], 0
    for n in seqlens:
        if n:
            sl = slice(start, start + n)
            mask = None if window is None else _segment_mask(n, window, positions[sl])[None, None]
            # 4-D inputs: with 3-D ones SDPA on CPU takes its slow math path (n x n scores in memory)
            outs.append(F.scaled_dot_product_attention(
                q[None, :, sl], k[None, :, sl], v[None, :, sl], attn_mask=mask, dropout_p=dropout,
                is_causal=mask is None, scale=scale, enable_gqa=gqa)[0])
        start += n
    out = torch.cat(outs, dim=1) if outs else q.new_empty(q.shape)
    return out.transpose(0, 1)


def dpvr_varlen_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    dpvr_segments: VarlenSegments | None = None,
    sliding_window: int | None = None,
    dpvr_attention_weights: bool = False,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Attention for the text stream and side branch; signature of transformers' attention functions.

    ``query`` ``[B, H, q, Dh]``, ``key``/``value`` ``[B, Hkv, k, Dh]``; returns ``[B, q, H, Dh]`` and, with
    ``dpvr_attention_weights`` (``output_attentions`` of an eager model), the weights as eager attention computes
    them: block-diagonal ``[1, H, T, T]`` over a packed stream, ``[B, H, q, k]`` in a decode step.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if dpvr_attention_weights:
        if dpvr_segments is None:
            out, weights = _weighted(query, key, value, attention_mask, scale, dropout, module.training)
            return out.transpose(1, 2).contiguous(), weights
        out, weights = segment_weights_attention(query[0], key[0], value[0], dpvr_segments, scale, dropout=dropout,
                                                 training=module.training, window=sliding_window)
        return out.unsqueeze(0), weights.unsqueeze(0)
    if dpvr_segments is None:
        # Decode step of a deep layer: the patched forward passes a boolean mask over the text-only cache.
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous(), None

    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise RuntimeError("varlen attention expects packed [1, H, T, Dh] queries and keys of the same stream")
    q, k, v = query[0], key[0], value[0]  # [H, T, Dh]
    if dpvr_segments.cu_seqlens.device != q.device:  # a device_map put this layer on another device than the plan
        positions = dpvr_segments.positions
        dpvr_segments = dataclasses.replace(dpvr_segments, cu_seqlens=dpvr_segments.cu_seqlens.to(q.device),
                                            positions=None if positions is None else positions.to(q.device))
    if dpvr_segments.window_binds(sliding_window):
        out = attend_segments(q, k, v, dpvr_segments.seqlens, scale, dropout=dropout, window=sliding_window,
                              positions=dpvr_segments.positions)
        return out.unsqueeze(0), None
    path = varlen_backend(q.device, q.dtype)
    if path == "flash_attn":
        out = _flash_attn_varlen()(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), dpvr_segments.cu_seqlens,
            dpvr_segments.cu_seqlens, dpvr_segments.max_seqlen, dpvr_segments.max_seqlen,
            dropout_p=dropout, softmax_scale=scale, causal=True,
        )
    else:
        out = None
        if path == "torch_varlen" and dropout == 0.0:  # varlen_attn has no dropout
            out = _torch_varlen_attention(q, k, v, dpvr_segments, scale)
        if out is None:
            out = attend_segments(q, k, v, dpvr_segments.seqlens, scale, dropout=dropout)
    return out.unsqueeze(0), None


def register() -> None:
    """Register ``"dpvr_varlen"`` with transformers' AttentionInterface (idempotent)."""
    AttentionInterface.register(ATTN_NAME, dpvr_varlen_attention)
