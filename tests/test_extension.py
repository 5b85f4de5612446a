"""Raw kernels of the compiled extension ``dpvr_kernels._C`` against plain-torch references.

Checks ``torch.ops.dpvr_C.route_split`` / ``fuse_merge`` bit-exactly (``torch.equal``) for several dtypes,
row sizes, empty cases, strided (non-contiguous) inputs, and the argument checks of the binding.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("DPVR_NO_EXTENSION") == "1":  # an explicit pure-Python install: nothing to test here
    pytest.skip("installed with DPVR_NO_EXTENSION=1 (no compiled extension)", allow_module_level=True)
# Otherwise the extension must be there (make install builds it): a failed build fails this module.
import dpvr_kernels._C as _C  # noqa: E402

from dpvr_kernels.ops import _extension

route_split = torch.ops.dpvr_C.route_split
fuse_merge = torch.ops.dpvr_C.fuse_merge

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DIMS = [1, 7, 96, 130]

_CUDA_OK = torch.cuda.is_available() and bool(_C.has_cuda())
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA GPU and an extension built with CUDA"),
        ],
    ),
]


# ----------------------------------------------------------------------------- helpers / references


def rand(*shape: int, dtype: torch.dtype, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """Fresh random data (never zeros), for float and integer dtypes."""
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return torch.randint(1, 100, shape, generator=gen).to(dtype).to(device)


def ref_route_split(hidden: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    L = hidden.shape[1]
    return hidden[gather_index // L, gather_index % L]


def ref_fuse_merge(text, image, base, merge_index, B, L):
    D = text.shape[1]
    src = torch.cat([text, image])
    k = merge_index
    zeros = torch.zeros(B * L, D, dtype=text.dtype, device=text.device)
    gathered = src.index_select(0, k.clamp(min=0)) if src.shape[0] > 0 else zeros
    fallback = base.reshape(B * L, D) if base is not None else zeros
    return torch.where((k < 0)[:, None], fallback, gathered).reshape(B, L, D)


def make_merge_index(B: int, L: int, T: int, V: int, gen: torch.Generator, pad_frac: float = 0.2):
    """A permutation-like merge index: every text/image row used once, the remaining rows are pads (-1)."""
    n = B * L
    assert T + V <= n
    idx = torch.full((n,), -1, dtype=torch.long)
    pos = torch.randperm(n, generator=gen)[: T + V]
    idx[pos] = torch.arange(T + V)
    # a few rows pulled a second time (merge is a gather, repeats are legal for the raw kernel)
    if T + V > 0:
        extra = torch.randperm(n, generator=gen)[: max(1, int(n * pad_frac) // 4)]
        idx[extra] = torch.randint(-1, T + V, (extra.numel(),), generator=gen)
    return idx


# ----------------------------------------------------------------------------- loader


def test_loader_reports_extension():
    assert _extension.load() is _C
    assert _extension.available()
    assert _extension.has_cuda() == bool(_C.has_cuda())
    if torch.version.cuda is None:
        assert not _C.has_cuda()


def test_loader_warns_once_when_missing(monkeypatch):
    """A missing extension gives one RuntimeWarning and None; available()/has_cuda() never warn."""
    import sys
    import warnings

    import dpvr_kernels

    # make `from dpvr_kernels import _C` fail as if the extension had never been built
    monkeypatch.delattr(dpvr_kernels, "_C")
    monkeypatch.setitem(sys.modules, "dpvr_kernels._C", None)
    for name, value in (("_tried", False), ("_module", None), ("_reason", None), ("_warned", False)):
        monkeypatch.setattr(_extension, name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _extension.available()
        assert not _extension.has_cuda()
        assert _extension.load(warn=False) is None
        assert _extension.load() is None
        assert _extension.load() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "compiled extension not available" in messages[0]
    assert "pip install -e . --no-build-isolation" in messages[0]
    assert "dpvr_kernels._C" in (_extension.unavailable_reason() or "")


# ----------------------------------------------------------------------------- route_split


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("D", DIMS)
def test_route_split_matches_reference(device, dtype, D):
    gen = torch.Generator().manual_seed(D * 7 + FLOAT_DTYPES.index(dtype))
    B, L = 3, 37
    hidden = rand(B, L, D, dtype=dtype, gen=gen, device=device)
    # random gather with repeats, then a sorted run (exercises the contiguous-run memcpy, across batches)
    idx = torch.cat([torch.randint(0, B * L, (50,), generator=gen), torch.arange(L - 5, 2 * L + 4)]).to(
        device
    )
    out = route_split(hidden, idx)
    assert out.shape == (idx.numel(), D) and out.dtype == dtype and out.is_contiguous()
    assert out.device == hidden.device
    assert torch.equal(out, ref_route_split(hidden, idx))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.bool])
def test_route_split_other_dtypes(device, dtype):
    gen = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        hidden = (torch.rand(2, 9, 5, generator=gen) > 0.5).to(device)
    else:
        hidden = rand(2, 9, 5, dtype=dtype, gen=gen, device=device)
    idx = torch.randint(0, 18, (11,), generator=gen).to(device)
    assert torch.equal(route_split(hidden, idx), ref_route_split(hidden, idx))


def strided_3d(layout: str, B: int, L: int, D: int, dtype, gen, device) -> torch.Tensor:
    """A non-contiguous [B, L, D] view with stride(2) == 1."""
    if layout == "slice_l":
        t = rand(B, 2 * L, D, dtype=dtype, gen=gen, device=device)[:, 1::2, :]
    elif layout == "transpose_b":
        t = rand(L, B, D, dtype=dtype, gen=gen, device=device).transpose(0, 1)
    elif layout == "offset_d":  # rows start at an odd element offset: unaligned row pointers
        t = rand(B, L, D + 3, dtype=dtype, gen=gen, device=device)[:, :, 1 : D + 1]
    elif layout == "expand_b":  # stride 0 in batch
        t = rand(1, L, D, dtype=dtype, gen=gen, device=device).expand(B, L, D)
    else:
        raise ValueError(layout)
    assert t.stride(2) == 1 or D == 1
    assert not t.is_contiguous()
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("D", [1, 7, 130])
@pytest.mark.parametrize("layout", ["slice_l", "transpose_b", "offset_d", "expand_b"])
def test_route_split_strided_hidden(device, dtype, D, layout):
    gen = torch.Generator().manual_seed(D + 100)
    B, L = 4, 19
    hidden = strided_3d(layout, B, L, D, dtype, gen, device)
    idx = torch.cat([torch.randint(0, B * L, (40,), generator=gen), torch.arange(B * L)]).to(device)
    assert torch.equal(route_split(hidden, idx), ref_route_split(hidden, idx))


@pytest.mark.parametrize("device", DEVICES)
def test_route_split_empty(device):
    long = {"dtype": torch.long, "device": device}
    hidden = torch.randn(2, 5, 7, device=device)
    out = route_split(hidden, torch.empty(0, **long))
    assert out.shape == (0, 7) and out.dtype == hidden.dtype and out.device == hidden.device
    out = route_split(torch.randn(0, 5, 7, device=device), torch.empty(0, **long))
    assert out.shape == (0, 7)
    out = route_split(torch.randn(2, 5, 0, device=device), torch.tensor([0, 9], **long))
    assert out.shape == (2, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_route_split_large_parallel(device):
    """Big enough that at::parallel_for splits the rows across threads (LLaVA-like layout)."""
    gen = torch.Generator().manual_seed(5)
    B, L, D = 4, 160, 512
    hidden = torch.randn(B, L, D, generator=gen).to(device)
    image = torch.cat([torch.arange(b * L + 10, b * L + 10 + 128) for b in range(B)])
    text = torch.cat(
        [
            torch.cat([torch.arange(b * L, b * L + 10), torch.arange(b * L + 138, b * L + 160)])
            for b in range(B)
        ]
    )
    for idx in (image, text, torch.randperm(B * L, generator=gen)):
        idx = idx.to(device)
        assert torch.equal(route_split(hidden, idx), ref_route_split(hidden, idx))


@pytest.mark.parametrize("device", DEVICES)
def test_many_rows_grid_stride(device):
    """More rows than one launch covers (the CUDA grid is capped; kernels loop over rows)."""
    gen = torch.Generator().manual_seed(9)
    B, L, D = 4, 150_000, 1
    hidden = torch.randn(B, L, D, generator=gen).to(device)
    idx = torch.randint(0, B * L, (B * L,), generator=gen).to(device)
    assert torch.equal(route_split(hidden, idx), ref_route_split(hidden, idx))
    T = 1000
    text, image = hidden.view(-1, D)[:T], hidden.view(-1, D)[T : 2 * T]
    merge = torch.randint(-1, 2 * T, (B * L,), generator=gen).to(device)
    assert torch.equal(
        fuse_merge(text, image, hidden, merge, B, L), ref_fuse_merge(text, image, hidden, merge, B, L)
    )


def test_route_split_output_is_fresh():
    hidden = torch.randn(2, 3, 4)
    idx = torch.arange(6)
    out = route_split(hidden, idx)
    assert out.data_ptr() != hidden.data_ptr()
    out.zero_()
    assert hidden.abs().sum() > 0


# ----------------------------------------------------------------------------- fuse_merge


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("with_base", [False, True])
def test_fuse_merge_matches_reference(device, dtype, D, with_base):
    gen = torch.Generator().manual_seed(D * 13 + FLOAT_DTYPES.index(dtype) + 50 * with_base)
    B, L, T, V = 3, 29, 30, 40
    text = rand(T, D, dtype=dtype, gen=gen, device=device)
    image = rand(V, D, dtype=dtype, gen=gen, device=device)
    base = rand(B, L, D, dtype=dtype, gen=gen, device=device) if with_base else None
    idx = make_merge_index(B, L, T, V, gen)
    idx[:6] = torch.arange(T - 3, T + 3)  # a run crossing text -> image
    idx = idx.to(device)
    out = fuse_merge(text, image, base, idx, B, L)
    assert out.shape == (B, L, D) and out.dtype == dtype and out.is_contiguous()
    assert out.device == text.device
    assert torch.equal(out, ref_fuse_merge(text, image, base, idx, B, L))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T,V", [(0, 20), (20, 0), (0, 0)])
@pytest.mark.parametrize("with_base", [False, True])
def test_fuse_merge_empty_streams(device, dtype, T, V, with_base):
    gen = torch.Generator().manual_seed(T + 3 * V + 7 * with_base)
    B, L, D = 2, 16, 7
    text = rand(T, D, dtype=dtype, gen=gen, device=device)
    image = rand(V, D, dtype=dtype, gen=gen, device=device)
    base = rand(B, L, D, dtype=dtype, gen=gen, device=device) if with_base else None
    idx = make_merge_index(B, L, T, V, gen).to(device)
    out = fuse_merge(text, image, base, idx, B, L)
    assert torch.equal(out, ref_fuse_merge(text, image, base, idx, B, L))


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_merge_no_rows(device):
    text, image = torch.randn(0, 5, device=device), torch.randn(0, 5, device=device)
    empty_index = torch.empty(0, dtype=torch.long, device=device)
    out = fuse_merge(text, image, None, empty_index, 0, 7)
    assert out.shape == (0, 7, 5)
    out = fuse_merge(text, image, torch.randn(3, 0, 5, device=device), empty_index, 3, 0)
    assert out.shape == (3, 0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("D", [1, 7, 130])
@pytest.mark.parametrize("layout", ["slice_l", "transpose_b", "offset_d"])
def test_fuse_merge_strided_base(device, dtype, D, layout):
    gen = torch.Generator().manual_seed(D + 7)
    B, L, T, V = 3, 21, 15, 25
    base = strided_3d(layout, B, L, D, dtype, gen, device)
    text = rand(T, D, dtype=dtype, gen=gen, device=device)
    image = rand(V, D, dtype=dtype, gen=gen, device=device)
    idx = make_merge_index(B, L, T, V, gen, pad_frac=0.5).to(device)
    assert torch.equal(fuse_merge(text, image, base, idx, B, L), ref_fuse_merge(text, image, base, idx, B, L))


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_merge_row_strided_streams(device):
    """text/image need dense rows only (stride(-1) == 1); a row stride is honoured."""
    gen = torch.Generator().manual_seed(3)
    B, L, D, T, V = 2, 12, 9, 8, 10
    text = torch.randn(T, D + 4, generator=gen).to(device)[:, 4:]
    image = torch.randn(2 * V, D, generator=gen).to(device)[::2]
    idx = make_merge_index(B, L, T, V, gen).to(device)
    assert torch.equal(fuse_merge(text, image, None, idx, B, L), ref_fuse_merge(text, image, None, idx, B, L))


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_merge_large_parallel_roundtrip(device):
    """split -> merge restores the input (LLaVA-like layout, large enough to run on several threads)."""
    gen = torch.Generator().manual_seed(11)
    B, L, D = 4, 160, 512
    hidden = torch.randn(B, L, D, generator=gen).to(device)
    is_image = torch.zeros(B, L, dtype=torch.bool)
    is_image[:, 10:138] = True
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, -7:] = True
    flat = torch.arange(B * L)
    text_idx = flat[(~is_image & ~pad).flatten()]
    image_idx = flat[(is_image & ~pad).flatten()]
    merge = torch.full((B * L,), -1, dtype=torch.long)
    merge[text_idx] = torch.arange(text_idx.numel())
    merge[image_idx] = text_idx.numel() + torch.arange(image_idx.numel())
    text_idx, image_idx, merge = text_idx.to(device), image_idx.to(device), merge.to(device)
    text, image = route_split(hidden, text_idx), route_split(hidden, image_idx)
    assert torch.equal(fuse_merge(text, image, hidden, merge, B, L), hidden)
    zero_pads = fuse_merge(text, image, None, merge, B, L)
    assert torch.equal(zero_pads, hidden.masked_fill(pad.to(device)[..., None], 0.0))


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA GPU and an extension built with CUDA")
def test_cuda_side_stream():
    """Kernels run on the current stream (not the default one)."""
    gen = torch.Generator().manual_seed(2)
    B, L, D = 8, 640, 1024
    hidden = torch.randn(B, L, D, generator=gen).cuda()
    idx = torch.randperm(B * L, generator=gen).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = route_split(hidden, idx)
        # merging with the inverse permutation restores hidden
        merged = fuse_merge(out[:100], out[100:], None, idx.argsort(), B, L)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, ref_route_split(hidden, idx))
    assert torch.equal(merged, hidden)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or bool(_C.has_cuda()),
    reason="needs a GPU and an extension built without CUDA",
)
def test_cuda_tensors_without_cuda_build():
    hidden = torch.randn(2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        route_split(hidden, torch.arange(3, device="cuda"))


# ----------------------------------------------------------------------------- meta


def test_meta_shapes():
    hidden = torch.empty(2, 5, 8, device="meta", dtype=torch.bfloat16)
    out = route_split(hidden, torch.empty(6, dtype=torch.long, device="meta"))
    assert out.shape == (6, 8) and out.device.type == "meta" and out.dtype == torch.bfloat16
    text = torch.empty(3, 8, device="meta")
    image = torch.empty(4, 8, device="meta")
    out = fuse_merge(text, image, None, torch.empty(10, dtype=torch.long, device="meta"), 2, 5)
    assert out.shape == (2, 5, 8) and out.device.type == "meta"


# ----------------------------------------------------------------------------- errors


def test_route_split_errors():
    hidden = torch.randn(2, 5, 8)
    idx = torch.tensor([0, 3, 9])
    with pytest.raises(RuntimeError, match="hidden must be 3-D"):
        route_split(hidden[0], idx)
    with pytest.raises(RuntimeError, match="gather_index must be 1-D"):
        route_split(hidden, idx[None])
    with pytest.raises(RuntimeError, match="gather_index must be int64"):
        route_split(hidden, idx.int())
    with pytest.raises(RuntimeError, match=r"stride\(-1\) == 1"):
        route_split(hidden.transpose(1, 2), idx)
    with pytest.raises(RuntimeError, match="out of range"):
        route_split(hidden, torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="out of range"):
        route_split(hidden, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="no rows to gather from"):
        route_split(torch.randn(0, 5, 8), idx)
    # out-of-range index deep inside a multi-threaded copy is reported too
    big = torch.randn(4, 256, 64)
    bad = torch.arange(4 * 256)
    bad[700] = 4 * 256
    with pytest.raises(RuntimeError, match=r"gather_index\[700\] = 1024 is out of range"):
        route_split(big, bad)


def test_fuse_merge_errors():
    B, L, D = 2, 4, 6
    text, image = torch.randn(3, D), torch.randn(2, D)
    base = torch.randn(B, L, D)
    idx = torch.tensor([0, 1, 2, 3, 4, -1, -1, -1])
    with pytest.raises(RuntimeError, match="text must be 2-D"):
        fuse_merge(text[None], image, base, idx, B, L)
    with pytest.raises(RuntimeError, match="image must be 2-D"):
        fuse_merge(text, image[0], base, idx, B, L)
    with pytest.raises(RuntimeError, match="same hidden size"):
        fuse_merge(text, torch.randn(2, D + 1), base, idx, B, L)
    with pytest.raises(RuntimeError, match="text and image must have the same dtype"):
        fuse_merge(text, image.half(), base, idx, B, L)
    with pytest.raises(RuntimeError, match="base must have the dtype of text"):
        fuse_merge(text, image, base.double(), idx, B, L)
    with pytest.raises(RuntimeError, match=r"base must have shape \[B, L, D\]"):
        fuse_merge(text, image, torch.randn(B, L + 1, D), idx, B, L)
    with pytest.raises(RuntimeError, match="base must be 3-D"):
        fuse_merge(text, image, base.reshape(B * L, D), idx, B, L)
    with pytest.raises(RuntimeError, match="merge_index must be int64"):
        fuse_merge(text, image, base, idx.int(), B, L)
    with pytest.raises(RuntimeError, match="merge_index must have B \\* L = 8 entries"):
        fuse_merge(text, image, base, idx[:-1], B, L)
    with pytest.raises(RuntimeError, match=r"stride\(-1\) == 1"):
        fuse_merge(text, image, base.transpose(1, 2).contiguous().transpose(1, 2), idx, B, L)
    with pytest.raises(RuntimeError, match="non-negative"):
        fuse_merge(text, image, None, idx, -2, -4)
    bad = idx.clone()
    bad[3] = 5
    with pytest.raises(RuntimeError, match=r"merge_index\[3\] = 5 is out of range"):
        fuse_merge(text, image, base, bad, B, L)
