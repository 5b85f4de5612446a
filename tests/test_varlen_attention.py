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
    expected = attention._sdpa_per_segment(q, k, v, seg, scale, 0.0)
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
