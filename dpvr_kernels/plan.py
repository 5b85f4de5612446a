"""RoutePlan: who goes where, computed once per forward from the masks.

A plan says, for every token of a ``[B, L]`` batch, whether it is *text* (stays in the main stack),
*vision* (an image or video token: leaves for the side branch at the routing layer) or *pad*
(attention_mask 0), and holds the packed indices, ``cu_seqlens`` and positions that the route kernels and
varlen attention need.

Everything is built with device ops; the one device-to-host sync is a single ``.tolist()`` of the
``2 x B`` segment lengths, which output shapes and varlen attention (max lengths) need anyway, and of the
batch's position span (whether a sliding window can bind).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class RoutePlan:
    """Packed layout of the text and vision streams of one batch.

    Streams are sample-major and in ascending position within a sample. The packed buffer of
    ``route_split`` holds the text stream first, then the vision stream.
    """

    batch_size: int
    seq_len: int
    num_text: int
    num_vision: int
    gather_index: Tensor
    """int64 [T + V]: flat row (``b * L + l``) of each packed row, text rows first."""
    merge_index: Tensor
    """int64 [B * L]: packed row of each flat row (text in [0, T), vision in [T, T + V)), -1 for pad."""
    text_cu_seqlens: Tensor
    """int32 [S + 1]: text segment boundaries in the text stream (S = B, or the sequences of packed rows)."""
    vision_cu_seqlens: Tensor
    """int32 [S + 1]: vision segment boundaries in the vision stream."""
    max_text_len: int
    max_vision_len: int
    text_seqlens: tuple[int, ...]
    """Text tokens per segment, on the host (per-segment attention loops over them)."""
    vision_seqlens: tuple[int, ...]
    """Vision tokens per segment, on the host."""
    text_position_ids: Tensor
    """int64 [..., T]: the stock position of each text token, with the leading dims of ``position_ids`` (e.g. the
    three M-RoPE rows)."""
    vision_position_ids: Tensor
    """int64 [..., V]: the stock position of each vision token."""
    packed: bool = False
    """True when rows hold several sequences (segments are sequences, not samples)."""
    position_span: int = 0
    """Largest position difference between two real tokens of the batch (sliding windows bind at or above it)."""

    @property
    def device(self) -> torch.device:
        return self.gather_index.device

    @property
    def text_index(self) -> Tensor:
        return self.gather_index[: self.num_text]

    @property
    def vision_index(self) -> Tensor:
        return self.gather_index[self.num_text :]

    @property
    def pad_mask(self) -> Tensor:
        """bool [B, L]: True at pad positions."""
        return (self.merge_index < 0).view(self.batch_size, self.seq_len)

    def __repr__(self) -> str:
        return (
            f"RoutePlan(B={self.batch_size}, L={self.seq_len}, text={self.num_text} (max {self.max_text_len}), "
            f"vision={self.num_vision} (max {self.max_vision_len}), device={self.device})"
        )


def _check_2d(name: str, t: Tensor, shape: tuple[int, int]) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape [B, L] = {list(shape)}, got {list(t.shape)}")


def packed_sequence_ids(position_ids: Tensor) -> Tensor:
    """Sequence index ``[B, L]`` of each token of padding-free packed rows: a new sequence starts wherever the
    position does not follow the previous one (what transformers' masks do for packed rows)."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def sequence_ids_from_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """Sequence index ``[1, L]`` of each token of one packed row from flash-attn style ``cu_seq_lens``."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seq_lens must be 1-D with at least 2 entries, got shape {list(cu_seqlens.shape)}")
    tokens = torch.arange(seq_len, device=cu_seqlens.device)
    return (torch.bucketize(tokens, cu_seqlens[1:].to(tokens.dtype), right=True))[None]


def build_route_plan_from_mask(
    vision_mask: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    sequence_ids: Tensor | None = None,
) -> RoutePlan:
    """Build a plan from a boolean vision mask ``[B, L]`` (True at image and video tokens).

    ``attention_mask`` ``[B, L]`` (1 = real token, 0 = pad; ``None`` = no padding) decides pad roles; a
    vision token with attention_mask 0 is pad. ``position_ids`` (``[B, L]`` or ``[1, L]``, with any leading dims,
    e.g. ``[3, B, L]`` M-RoPE rows) are the stock positions, gathered per token; the first row orders the tokens
    (the position span). ``None`` means ``arange(L)``, what the stock decoder uses for a prefill without them.
    ``sequence_ids`` (int ``[B, L]``, non-decreasing from 0 along each row) splits padding-free packed rows
    into sequences: each sequence then is its own segment of the text stream and the side branch
    (see :func:`packed_sequence_ids`); ``None`` means one sequence per row.
    """
    if vision_mask.dim() != 2:
        raise ValueError(f"vision_mask must be 2-D [B, L], got shape {list(vision_mask.shape)}")
    bsz, seq_len = vision_mask.shape
    if bsz == 0 or seq_len == 0:
        raise ValueError(f"cannot route an empty batch (B={bsz}, L={seq_len})")
    device = vision_mask.device
    vision_mask = vision_mask.bool()
    if attention_mask is None:
        valid = torch.ones_like(vision_mask)
    else:
        _check_2d("attention_mask", attention_mask, (bsz, seq_len))
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {device}: move both to one device")
        valid = attention_mask.bool()
    if position_ids is None:
        lead: tuple[int, ...] = ()
        rows = torch.arange(seq_len, device=device).expand(1, bsz, seq_len)
    else:
        if position_ids.dim() < 2 or position_ids.shape[-1] != seq_len or position_ids.shape[-2] not in (1, bsz):
            raise ValueError(f"position_ids must have shape [..., B, L] or [..., 1, L] with B={bsz}, L={seq_len}, "
                             f"got {list(position_ids.shape)}")
        lead = tuple(position_ids.shape[:-2])
        rows = position_ids.to(device=device, dtype=torch.long).expand(*lead, bsz, seq_len).reshape(-1, bsz, seq_len)
    positions = rows[0]  # orders the tokens (the 1-D positions, or the first M-RoPE row)

    is_vision = vision_mask & valid
    is_text = valid & ~vision_mask
    big = torch.iinfo(torch.long).max
    span = (positions.masked_fill(~valid, -big).amax() - positions.masked_fill(~valid, big).amin()).clamp(min=0)
    if sequence_ids is None:
        text_counts = is_text.sum(1)
        vision_counts = is_vision.sum(1)
        # The only host sync: the segment lengths (shapes, varlen attention) and the position span (windows).
        host = torch.cat([text_counts, vision_counts, span[None]]).tolist()
        text_seqlens, vision_seqlens, position_span = host[:bsz], host[bsz : 2 * bsz], host[-1]
    else:
        text_counts, vision_counts, text_seqlens, vision_seqlens, position_span = _packed_counts(
            sequence_ids, is_text, is_vision, span)
    num_text, num_vision = sum(text_seqlens), sum(vision_seqlens)

    flat_text = is_text.reshape(-1)
    flat_vision = is_vision.reshape(-1)
    text_rank = flat_text.cumsum(0) - 1
    vision_rank = flat_vision.cumsum(0) - 1 + num_text
    merge_index = torch.where(flat_text, text_rank, torch.where(flat_vision, vision_rank, -1))
    # Invert merge_index without a nonzero() (which would sync): pad rows land in a spare last slot.
    dest = torch.where(merge_index >= 0, merge_index, num_text + num_vision)
    gather_index = torch.empty(num_text + num_vision + 1, dtype=torch.long, device=device)
    gather_index.scatter_(0, dest, torch.arange(bsz * seq_len, device=device))
    gather_index = gather_index[: num_text + num_vision]

    zero = torch.zeros(1, dtype=torch.int32, device=device)
    text_cu = torch.cat([zero, text_counts.cumsum(0).to(torch.int32)])
    vision_cu = torch.cat([zero, vision_counts.cumsum(0).to(torch.int32)])
    flat_pos = rows.reshape(rows.shape[0], -1)
    return RoutePlan(
        batch_size=bsz,
        seq_len=seq_len,
        num_text=num_text,
        num_vision=num_vision,
        gather_index=gather_index,
        merge_index=merge_index,
        text_cu_seqlens=text_cu,
        vision_cu_seqlens=vision_cu,
        max_text_len=max(text_seqlens),
        max_vision_len=max(vision_seqlens),
        text_seqlens=tuple(text_seqlens),
        vision_seqlens=tuple(vision_seqlens),
        text_position_ids=flat_pos.index_select(1, gather_index[:num_text]).reshape(*lead, num_text),
        vision_position_ids=flat_pos.index_select(1, gather_index[num_text:]).reshape(*lead, num_vision),
        packed=sequence_ids is not None,
        position_span=position_span,
    )


def _packed_counts(sequence_ids: Tensor, is_text: Tensor, is_vision: Tensor, span: Tensor):
    """Per-sequence token counts of packed rows, with the same single host sync as the unpacked plan."""
    bsz, seq_len = is_text.shape
    if tuple(sequence_ids.shape) != (bsz, seq_len):
        raise ValueError(f"sequence_ids must have shape [B, L] = {[bsz, seq_len]}, got {list(sequence_ids.shape)}")
    seq = sequence_ids.to(device=is_text.device, dtype=torch.long)
    # Sequence s of row b counts in slot b * L + s (s < L always): a fixed-size table, no sync to size it.
    slot = (seq + torch.arange(bsz, device=seq.device)[:, None] * seq_len).reshape(-1)
    table = torch.zeros(2, bsz * seq_len, dtype=torch.long, device=seq.device)
    table[0].index_add_(0, slot, is_text.reshape(-1).long())
    table[1].index_add_(0, slot, is_vision.reshape(-1).long())
    n_seq = seq[:, -1] + 1
    host = torch.cat([n_seq, table.reshape(-1), span[None]]).tolist()
    n_seq_host, table_host, position_span = host[:bsz], host[bsz:-1], host[-1]
    text_seqlens, vision_seqlens = [], []
    for b, n in enumerate(n_seq_host):
        text_seqlens += table_host[b * seq_len : b * seq_len + n]
        vision_seqlens += table_host[(bsz + b) * seq_len : (bsz + b) * seq_len + n]
    text_counts = torch.tensor(text_seqlens, dtype=torch.long, device=seq.device)
    vision_counts = torch.tensor(vision_seqlens, dtype=torch.long, device=seq.device)
    return text_counts, vision_counts, text_seqlens, vision_seqlens, position_span


def build_route_plan(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_token_id: int,
    position_ids: Tensor | None = None,
) -> RoutePlan:
    """Build the :class:`RoutePlan` of a batch: image tokens are ``input_ids == image_token_id``.

    Args:
        input_ids: int ``[B, L]``.
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding; ``None`` means no padding.
        image_token_id: the model's ``config.image_token_id``.
        position_ids: the stock positions (``[B, L]`` or ``[1, L]``); ``None`` means ``arange(L)``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, L], got shape {list(input_ids.shape)}")
    if input_ids.is_floating_point():
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    return build_route_plan_from_mask(input_ids == image_token_id, attention_mask, position_ids)
