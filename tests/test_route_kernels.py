"""route_split / fuse_merge: every backend bit-exact against plain per-sample torch loops."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import IMAGE_TOKEN, batch_layouts, layout_tensors

import dpvr_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIMS = [1, 7, 96, 130, 4096]


def cpu_backends() -> list[str]:
    backends = ["torch"]
    if os.environ.get("DPVR_NO_EXTENSION") != "1":  # the extension is part of the install: test it (a
        backends.append("cpu")  # missing build then fails loudly instead of dropping the backend)
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    return backends


BACKENDS = cpu_backends()


def loop_reference(layout, hidden):
    """Per-sample loops: the text and image rows in order, and the merge of (text, image, base)."""
    text_rows, image_rows = [], []
    for b, roles in enumerate(layout):
        for pos, role in enumerate(roles):
            if role == "text":
                text_rows.append(hidden[b, pos])
            elif role == "image":
                image_rows.append(hidden[b, pos])
    D = hidden.shape[-1]
    text = torch.stack(text_rows) if text_rows else hidden.new_empty(0, D)
    image = torch.stack(image_rows) if image_rows else hidden.new_empty(0, D)
    return text, image


def loop_merge(layout, text, image, base):
    out = base.clone()
    t = i = 0
    for b, roles in enumerate(layout):
        for pos, role in enumerate(roles):
            if role == "text":
                out[b, pos] = text[t]
                t += 1
            elif role == "image":
                out[b, pos] = image[i]
                i += 1
    return out


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=batch_layouts())
def test_plan_matches_loops(layout):
    ids, mask, positions = layout_tensors(layout)
    plan = dpvr_kernels.build_route_plan(ids, mask, IMAGE_TOKEN, position_ids=positions)
    L = len(layout[0])
    text_idx = [b * L + p for b, r in enumerate(layout) for p, role in enumerate(r) if role == "text"]
    image_idx = [b * L + p for b, r in enumerate(layout) for p, role in enumerate(r) if role == "image"]
    assert plan.num_text == len(text_idx) and plan.num_vision == len(image_idx)
    assert plan.text_index.tolist() == text_idx
    assert plan.vision_index.tolist() == image_idx
    merge = [-1] * (len(layout) * L)
    for k, row in enumerate(text_idx + image_idx):
        merge[row] = k
    assert plan.merge_index.tolist() == merge
    text_counts = [r.count("text") for r in layout]
    image_counts = [r.count("image") for r in layout]
    assert plan.text_cu_seqlens.dtype == torch.int32
    assert plan.text_cu_seqlens.tolist() == [sum(text_counts[:i]) for i in range(len(layout) + 1)]
    assert plan.vision_cu_seqlens.tolist() == [sum(image_counts[:i]) for i in range(len(layout) + 1)]
    assert plan.max_text_len == max(text_counts) and plan.max_vision_len == max(image_counts)
    flat_pos = positions.flatten().tolist()
    assert plan.text_position_ids.tolist() == [flat_pos[i] for i in text_idx]
    assert plan.vision_position_ids.tolist() == [flat_pos[i] for i in image_idx]


def test_plan_defaults_no_mask_no_positions():
    ids = torch.tensor([[1, IMAGE_TOKEN, IMAGE_TOKEN, 2, 3]])
    plan = dpvr_kernels.build_route_plan(ids, None, IMAGE_TOKEN)
    assert plan.text_index.tolist() == [0, 3, 4] and plan.vision_index.tolist() == [1, 2]
    assert plan.text_position_ids.tolist() == [0, 3, 4]  # original positions, no renumbering
    assert plan.vision_position_ids.tolist() == [1, 2]


def _max_rows(backend: str) -> int:
    return 48 if backend == "triton" else 10_000  # the Triton interpreter runs one program at a time


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_split_merge_bit_exact(backend, dtype, data):
    max_l = 300 if backend != "triton" else 12
    layout = data.draw(batch_layouts(max_b=5 if backend != "triton" else 3, max_l=max_l))
    D = data.draw(st.sampled_from(DIMS if backend != "triton" else [1, 7, 96, 130]))
    B, L = len(layout), len(layout[0])
    if B * L * D > 2_000_000:
        D = 130
    ids, mask, positions = layout_tensors(layout)
    plan = dpvr_kernels.build_route_plan(ids, mask, IMAGE_TOKEN, position_ids=positions)
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    non_contiguous = data.draw(st.booleans())
    if non_contiguous:  # a view with a gap between positions and a transposed batch
        big = torch.randn(L, B, 2 * D + 3, generator=g).to(dtype)
        hidden = big.transpose(0, 1)[:, :, 1 : D + 1]
        assert B * L == 1 or not hidden.is_contiguous()
    else:
        hidden = torch.randn(B, L, D, generator=g).to(dtype)

    text, image = dpvr_kernels.route_split(hidden, plan, backend=backend)
    ref_text, ref_image = loop_reference(layout, hidden)
    assert_bits_equal(text, ref_text)
    assert_bits_equal(image, ref_image)

    new_text = torch.randn(text.shape, generator=g).to(dtype)
    new_image = torch.randn(image.shape, generator=g).to(dtype)
    base = hidden
    merged = dpvr_kernels.fuse_merge(new_text, new_image, base, plan, backend=backend)
    assert merged.is_contiguous()
    assert_bits_equal(merged, loop_merge(layout, new_text, new_image, base))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_and_nan_survive(backend):
    ids = torch.tensor([[1, IMAGE_TOKEN, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    plan = dpvr_kernels.build_route_plan(ids, mask, IMAGE_TOKEN)
    text = torch.tensor([[-0.0, 1.0, float("nan")], [2.0, -0.0, 3.0]])
    image = torch.tensor([[-0.0, float("inf"), -1.0]])
    base = torch.full((1, 4, 3), -0.0)
    out = dpvr_kernels.fuse_merge(text, image, base, plan, backend=backend)
    assert_bits_equal(out, loop_merge([["text", "image", "text", "pad"]], text, image, base))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    ids = torch.tensor([[IMAGE_TOKEN, 3, IMAGE_TOKEN, 4, 5, 0], [0, 6, IMAGE_TOKEN, IMAGE_TOKEN, 2, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    plan = dpvr_kernels.build_route_plan(ids, mask, IMAGE_TOKEN)
    hidden = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)

    def split(h):
        return dpvr_kernels.route_split(h, plan, backend=backend)

    assert torch.autograd.gradcheck(split, (hidden,))
    text = torch.randn(plan.num_text, 5, dtype=torch.float64, requires_grad=True)
    image = torch.randn(plan.num_vision, 5, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)

    def merge(t, i, b):
        return dpvr_kernels.fuse_merge(t, i, b, plan, backend=backend)

    assert torch.autograd.gradcheck(merge, (text, image, base))
    # gradients reach base at pad rows only
    merge(text, image, base).sum().backward()
    assert base.grad[plan.pad_mask].eq(1).all() and base.grad[~plan.pad_mask].eq(0).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    ids = torch.tensor([[IMAGE_TOKEN, 3, IMAGE_TOKEN, 4, 5, 0], [0, 6, IMAGE_TOKEN, IMAGE_TOKEN, 2, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    plan = dpvr_kernels.build_route_plan(ids, mask, IMAGE_TOKEN)
    hidden = torch.randn(2, 6, 33)

    def step(h):
        text, image = dpvr_kernels.route_split(h, plan, backend=backend)
        return dpvr_kernels.fuse_merge(text * 2, -image, h, plan, backend=backend)  # exact ops: bitwise comparable

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(hidden), step(hidden))


def _plan():
    ids = torch.tensor([[1, IMAGE_TOKEN, 2]])
    return dpvr_kernels.build_route_plan(ids, None, IMAGE_TOKEN)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.randn(3, 4), ValueError, "3-D"),
        (lambda: torch.randn(2, 3, 4), ValueError, "plan was built for"),
        (lambda: torch.randn(1, 4, 4), ValueError, "plan was built for"),
        (lambda: torch.randint(0, 5, (1, 3, 4)), TypeError, "floating-point"),
        (lambda: torch.randn(1, 3, 4, device="meta"), ValueError, "build the plan on meta"),
    ],
)
def test_bad_hidden(make, error, match):
    with pytest.raises(error, match=match):
        dpvr_kernels.route_split(make(), _plan())


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*choose one of"):
        dpvr_kernels.route_split(torch.randn(1, 3, 4), _plan(), backend="fast")


def test_unavailable_backend_names_the_fix():
    with pytest.raises(RuntimeError, match="backend='auto'"):
        dpvr_kernels.route_split(torch.randn(1, 3, 4), _plan(), backend="cuda")


def test_merge_checks_stream_shapes():
    plan = _plan()
    base = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match=r"text must have shape \[2, 4\]"):
        dpvr_kernels.fuse_merge(torch.randn(3, 4), torch.randn(1, 4), base, plan)
    with pytest.raises(ValueError, match="cast/move them to match"):
        dpvr_kernels.fuse_merge(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4), base, plan)


def test_plan_bad_input():
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        dpvr_kernels.build_route_plan(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), IMAGE_TOKEN)
    with pytest.raises(TypeError, match="integer"):
        dpvr_kernels.build_route_plan(torch.ones(2, 3), None, IMAGE_TOKEN)
