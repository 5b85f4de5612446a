"""Position schemes: what a class's decoder takes as positions, so that each stream gathers every token's own
(contract rules 5 and 8). A class row (``classes.py``) names its scheme; adding a scheme is adding a case here.

- ``"rope"``: 1-D positions ``[B|1, L]`` (Llama, Mistral, Qwen2 decoders). The stock decoder hands the same
  tensor to its rotary embedding, its masks and its layers.
- ``"mrope"``: multimodal RoPE (Qwen2-VL, Qwen2.5-VL, GLM-4V): ``[3, B, L]`` rows (temporal, height, width) from
  the model's own ``get_rope_index``, which the multimodal wrapper computes (and continues from ``rope_deltas`` in
  decode steps). A text token has ``t = h = w``; a vision token its grid cell. A ``[4, B, L]`` input carries 1-D
  text positions first, which the stock masks read (packed rows); ``[3, B, L]`` inputs give the masks none.
- ``"mrope_text"``: the same rows (interleaved or not: the decoder's rotary embedding knows), from a decoder
  that gives its masks 1-D text positions whenever it makes the rows itself (Qwen3-VL: ``None`` and ``[B, L]``
  inputs become 4 rows, the first the text positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ROPE = "rope"
MROPE = "mrope"
MROPE_TEXT = "mrope_text"
SCHEMES = (ROPE, MROPE, MROPE_TEXT)

__all__ = [
    "MROPE",
    "MROPE_TEXT",
    "ROPE",
    "SCHEMES",
    "CallPositions",
    "call_positions",
    "order_row",
    "rope_input",
    "stream_layer_positions",
]


@dataclass(frozen=True)
class CallPositions:
    """The positions of one decoder call, split as the stock decoder uses them."""

    rope: Tensor
    """What the rotary embedding takes, and what the route plan gathers per token: ``[B|1, L]`` or ``[3, B|1, L]``."""
    stock: Tensor | None
    """The 2-D ``position_ids`` the stock decoder gives its masks and layers (None where it gives none)."""
    explicit: Tensor | None
    """2-D positions the caller passed, which stock reads to find packed sequences in a row; None if made here."""


def call_positions(scheme: str, position_ids: Tensor | None, batch: int, q_len: int, past, device) -> CallPositions:
    """Split a decoder call's ``position_ids`` (None: the stock default, ``past`` + ``arange(q_len)``)."""
    if scheme == ROPE:
        if position_ids is None:
            made = (torch.arange(q_len, device=device) + past).unsqueeze(0)
            return CallPositions(made, made, None)
        return CallPositions(position_ids, position_ids, position_ids)
    if scheme not in (MROPE, MROPE_TEXT):
        raise ValueError(f"unknown position scheme {scheme!r}; one of {SCHEMES}")
    text = scheme == MROPE_TEXT
    if position_ids is None:
        made = (torch.arange(q_len, device=device) + past).view(1, 1, -1).expand(3, batch, -1)
        return CallPositions(made, made[0] if text else None, None)
    if position_ids.dim() == 2:
        return CallPositions(position_ids[None].expand(3, *position_ids.shape), position_ids if text else None,
                             position_ids if text else None)
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return CallPositions(position_ids[1:], position_ids[0], position_ids[0])
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return CallPositions(position_ids, None, None)
    raise ValueError(f"M-RoPE position_ids must be [B, L], [3, B, L] or [4, B, L]; got {list(position_ids.shape)}")


def rope_input(stream_positions: Tensor) -> Tensor:
    """A packed stream's gathered positions (``[T]`` or ``[R, T]``) as the rotary embedding takes them."""
    return stream_positions.unsqueeze(-2)


def stream_layer_positions(stream_positions: Tensor) -> Tensor | None:
    """The ``position_ids`` a stream's layers get: its 1-D positions ``[1, T]``. None for M-RoPE, where the stock
    layers get none either (they read them only to find packed rows, which the varlen attention is told)."""
    return stream_positions.unsqueeze(0) if stream_positions.dim() == 1 else None


def order_row(stream_positions: Tensor) -> Tensor:
    """One row of a stream's gathered positions (``[T]`` or ``[R, T]``) that orders its tokens (sliding windows):
    the 1-D positions, or the first M-RoPE row (equal to the others on text tokens)."""
    return stream_positions if stream_positions.dim() == 1 else stream_positions[0]
