"""fuse_merge: write the text and vision streams back to their positions in ``[B, L, D]``.

Every output row is written exactly once, from the text stream, the vision stream or (pad rows) the
pre-route states ``base``: no memset and no second pass. Its backward is a split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import RoutePlan
from . import _extension
from .backends import resolve_backend
from .route_split import check_hidden

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _fuse_merge_kernel(
        text_ptr, image_ptr, base_ptr, index_ptr, out_ptr, num_text, seq_len, base_stride_b, base_stride_l, D,
        HAS_BASE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_row = cols < D
        # The row's source index, broadcast over the block (masks must be vectors).
        k = tl.zeros([BLOCK_D], dtype=tl.int64) + tl.load(index_ptr + row)
        is_text = (k >= 0) & (k < num_text)
        is_image = k >= num_text
        # Masked loads touch memory only where the mask is set: each row reads just its own source.
        # Select with where (not add) so that -0.0 and NaN payloads stay bit-exact.
        text_k = tl.where(is_text, k, 0)
        image_k = tl.where(is_image, k - num_text, 0)
        vals = tl.load(text_ptr + text_k * D + cols, mask=in_row & is_text, other=0)
        vals = tl.where(is_image, tl.load(image_ptr + image_k * D + cols, mask=in_row & is_image, other=0), vals)
        if HAS_BASE:
            b = row // seq_len
            pos = row % seq_len
            base_vals = tl.load(base_ptr + b * base_stride_b + pos * base_stride_l + cols, mask=in_row & (k < 0), other=0)
            vals = tl.where(k < 0, base_vals, vals)
        tl.store(out_ptr + row * D + cols, vals, mask=in_row)


def _merge_triton(text: Tensor, image: Tensor, base: Tensor | None, merge_index: Tensor, B: int, L: int) -> Tensor:
    D = text.shape[-1]
    out = text.new_empty(B, L, D)
    if out.numel() == 0:
        return out
    block = min(max(triton.next_power_of_2(D), 16), 1024)
    grid = (B * L, triton.cdiv(D, block))
    base_arg = base if base is not None else out  # never read when HAS_BASE is False
    sb, sl = (base.stride(0), base.stride(1)) if base is not None else (0, 0)
    _fuse_merge_kernel[grid](
        text, image, base_arg, merge_index, out, text.shape[0], L, sb, sl, D,
        HAS_BASE=base is not None, BLOCK_D=block,
    )
    return out


def _merge_torch(text: Tensor, image: Tensor, base: Tensor | None, merge_index: Tensor, B: int, L: int) -> Tensor:
    D = text.shape[-1]
    base_flat = base.reshape(B * L, D) if base is not None else text.new_zeros(B * L, D)
    packed = torch.cat([text, image], 0)
    if packed.shape[0] == 0:
        return base_flat.clone().view(B, L, D)
    out = packed.index_select(0, merge_index.clamp(min=0))
    return torch.where((merge_index < 0)[:, None], base_flat, out).view(B, L, D)


def merge_kernel(
    text: Tensor, image: Tensor, base: Tensor | None, merge_index: Tensor, B: int, L: int, kernel: str
) -> Tensor:
    """Run one merge kernel (``"triton"``, ``"ext"`` or ``"torch"``) on validated inputs."""
    text, image = text.contiguous(), image.contiguous()
    if base is not None and base.stride(-1) != 1:
        base = base.contiguous()
    if kernel == "triton":
        return _merge_triton(text, image, base, merge_index, B, L)
    if kernel == "ext":
        _extension.load()
        return torch.ops.dpvr_C.fuse_merge(text, image, base, merge_index, B, L)
    return _merge_torch(text, image, base, merge_index, B, L)


@torch.library.custom_op("dpvr::fuse_merge", mutates_args=())
def fuse_merge_op(
    text: Tensor, image: Tensor, base: Tensor | None, merge_index: Tensor, gather_index: Tensor, B: int, L: int,
    kernel: str,
) -> Tensor:
    """``[B, L, D]``: row r is ``text[k]``, ``image[k - T]`` or ``base[r]`` (zeros if None) for k = merge_index[r].

    ``gather_index`` (the inverse of ``merge_index``) is for the backward.
    """
    return merge_kernel(text, image, base, merge_index, B, L, kernel)


@fuse_merge_op.register_fake
def _(text, image, base, merge_index, gather_index, B, L, kernel):
    return text.new_empty(B, L, text.shape[-1])


def _merge_setup_context(ctx, inputs, output):
    text, image, base, merge_index, gather_index, B, L, kernel = inputs
    ctx.save_for_backward(merge_index, gather_index)
    ctx.num_text = text.shape[0]
    ctx.kernel = kernel


def _merge_backward(ctx, grad_out):
    merge_index, gather_index = ctx.saved_tensors
    T = ctx.num_text
    grad_text = grad_image = grad_base = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        # The gradient of a scatter is a gather: read the grads of the text and image rows in one pass.
        packed = torch.ops.dpvr.route_split(grad_out, gather_index, merge_index, T, ctx.kernel)
        grad_text, grad_image = packed[:T], packed[T:]
    if ctx.needs_input_grad[2]:
        grad_base = torch.where((merge_index < 0).view(*grad_out.shape[:2], 1), grad_out, 0)
    return grad_text, grad_image, grad_base, None, None, None, None, None


fuse_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


def fuse_merge(text: Tensor, vision: Tensor, base: Tensor, plan: RoutePlan, backend: str = "auto") -> Tensor:
    """Fuse the text stream ``[T, D]`` and vision stream ``[V, D]`` back into ``[B, L, D]``.

    Pad rows are taken from ``base`` (the pre-route states, ``[B, L, D]``). Differentiable in all three
    inputs (gradients reach ``base`` at pad rows only).
    """
    check_hidden("base", base, plan)
    for name, t, n in (("text", text, plan.num_text), ("vision", vision, plan.num_vision)):
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] != base.shape[-1]:
            raise ValueError(f"{name} must have shape [{n}, {base.shape[-1]}] for this plan, got {list(t.shape)}")
        if t.dtype != base.dtype or t.device != base.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but base is {base.dtype} on {base.device}: cast/move them to match"
            )
    kernel = resolve_backend(backend, base.device)
    return fuse_merge_op(
        text, vision, base, plan.merge_index, plan.gather_index, plan.batch_size, plan.seq_len, kernel
    )
