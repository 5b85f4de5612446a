"""The varlen attention dispatch against torch's ``varlen_attn`` of several releases (CUDA-only in torch, so
the releases' signatures are stood in for by fakes that compute the same function on CPU).

What could break on a GPU machine: a keyword that torch release does not take (2.11 has no ``enable_gqa``),
a wrong causal flag, or GQA heads not expanded. Each fake checks its inputs like the real one and computes
causal attention per segment; the dispatch must give the per-segment SDPA result bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpvr_kernels.models import attention
from dpvr_kernels.models.attention import VarlenSegments


def _attend(q, k, v, cu, causal: bool, scale: float | None, gqa: bool):
    # q [T, H, Dh], k/v [T, Hkv, Dh] (varlen_attn's layout)
    if k.shape[1] != q.shape[1] and not gqa:
        raise RuntimeError("number of heads in key/value must equal query heads")
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if b > a:
            o = F.scaled_dot_product_attention(q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2),
                                               v[None, a:b].transpose(1, 2), is_causal=causal, scale=scale,
                                               enable_gqa=gqa)
            outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


CALLS: list[dict] = []


def varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False):
    CALLS.append(dict(scale=scale, window_size=window_size, enable_gqa=enable_gqa, kv_heads=key.shape[1]))
    return _attend(query, key, value, cu_seq_q, window_size == (-1, 0), scale, enable_gqa)


def varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
    CALLS.append(dict(scale=scale, window_size=window_size, kv_heads=key.shape[1]))
    return _attend(query, key, value, cu_seq_q, window_size == (-1, 0), scale, False)


def varlen_early(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    CALLS.append(dict(is_causal=is_causal, kv_heads=key.shape[1]))
    return _attend(query, key, value, cu_seq_q, is_causal, None, False)


def _inputs(heads: int, kv_heads: int, seqlens=(5, 0, 1, 9), dh: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(seqlens)
    q = torch.randn(heads, t, dh, generator=g)
    k = torch.randn(kv_heads, t, dh, generator=g)
    v = torch.randn(kv_heads, t, dh, generator=g)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, VarlenSegments(cu, tuple(seqlens), max(seqlens))


@pytest.mark.parametrize("fn", [varlen_new, varlen_211, varlen_early], ids=["enable_gqa", "torch2.11", "is_causal"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_torch_varlen_call_matches_sdpa_per_segment(monkeypatch, fn, kv_heads):
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fn)
    q, k, v, seg = _inputs(4, kv_heads)
    scale = q.shape[-1] ** -0.5
    CALLS.clear()
    out = attention._torch_varlen_attention(q, k, v, seg, scale)
    expected = attention.attend_segments(q, k, v, seg.seqlens, scale)
    assert out is not None and torch.equal(out, expected)
    (call,) = CALLS
    if fn is varlen_new:
        assert call["enable_gqa"] == (kv_heads != 4) and call["kv_heads"] == kv_heads  # no copy of K/V
    else:
        assert call["kv_heads"] == 4  # heads expanded where the release cannot share them
    assert call.get("window_size", (-1, 0)) == (-1, 0) and call.get("is_causal", True)


def test_custom_scale_without_a_scale_argument_falls_back(monkeypatch):
    monkeypatch.setattr(attention, "_torch_varlen", lambda: varlen_early)
    q, k, v, seg = _inputs(4, 2)
    assert attention._torch_varlen_attention(q, k, v, seg, 0.5) is None  # the caller then runs SDPA per segment


def test_varlen_backend_choice():
    assert attention.varlen_backend(torch.device("cpu"), torch.bfloat16) == "sdpa_per_segment"
    assert attention.varlen_backend(torch.device("cuda"), torch.float32) == "sdpa_per_segment"


def _dense_reference(q, k, v, seqlens, scale, window=None, positions=None):
    """Plain softmax(q k^T) v over the whole packed stream in float64, with one [T, T] mask: same segment,
    not after the query, and (with a window) within it by original position."""
    t = q.shape[1]
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    idx = torch.arange(t)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    if window is not None:
        allowed &= positions[:, None] - positions[None, :] < window
    rep = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)
    scores = (q.double() @ k.transpose(1, 2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [6, 2, 1])
@pytest.mark.parametrize("window", [None, 4])
def test_attend_segments_matches_a_dense_reference(dtype, kv_heads, window):
    """The per-segment SDPA (CPU path, windowed path, vLLM side branch) against one dense masked softmax:
    odd head size, empty and one-token segments, GQA, positions with gaps (the text stream's), a window."""
    g = torch.Generator().manual_seed(7 + kv_heads)
    seqlens = (5, 0, 1, 11, 3)
    t, dh = sum(seqlens), 13
    q = torch.randn(6, t, dh, generator=g)
    k = torch.randn(kv_heads, t, dh, generator=g)
    v = torch.randn(kv_heads, t, dh, generator=g)
    positions = torch.cat([torch.randint(1, 4, (n,), generator=g).cumsum(0) for n in seqlens if n])
    scale = 0.37
    want = _dense_reference(q, k, v, seqlens, scale, window, positions)
    got = attention.attend_segments(q.to(dtype), k.to(dtype), v.to(dtype), seqlens, scale, window=window,
                                    positions=positions)
    assert got.shape == (t, 6, dh) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # within twice the error of the same dtype's plain reference against float64
        ref = _dense_reference(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), seqlens, scale,
                               window, positions).to(dtype)
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max()
