"""route_split: one pass over the hidden states ``[B, L, D]`` writes both packed streams.

The output is one buffer ``[T + V, D]`` (text rows, then vision rows); :func:`route_split` hands back
the two halves as views, so the split is one kernel, not two ``index_select``s. Its backward is a merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import RoutePlan
from . import _extension
from .backends import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional off Linux
    triton = None

if triton is not None:

    @triton.jit
    def _route_split_kernel(
        hidden_ptr, index_ptr, out_ptr, seq_len, stride_b, stride_l, D, BLOCK_D: tl.constexpr
    ):
        row = tl.program_id(0)
        src = tl.load(index_ptr + row)
        b = src // seq_len
        pos = src % seq_len
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        vals = tl.load(hidden_ptr + b * stride_b + pos * stride_l + cols, mask=mask)
        tl.store(out_ptr + row.to(tl.int64) * D + cols, vals, mask=mask)


def _block_d(D: int) -> int:
    return min(max(triton.next_power_of_2(D), 16), 1024)


def _split_triton(hidden: Tensor, gather_index: Tensor) -> Tensor:
    B, L, D = hidden.shape
    out = hidden.new_empty(gather_index.shape[0], D)
    if out.numel() == 0:
        return out
    block = _block_d(D)
    grid = (gather_index.shape[0], triton.cdiv(D, block))
    _route_split_kernel[grid](hidden, gather_index, out, L, hidden.stride(0), hidden.stride(1), D, BLOCK_D=block)
    return out


def _split_torch(hidden: Tensor, gather_index: Tensor) -> Tensor:
    B, L, D = hidden.shape
    if hidden.is_contiguous():
        return hidden.view(B * L, D).index_select(0, gather_index)
    return hidden[gather_index // L, gather_index % L]


def split_kernel(hidden: Tensor, gather_index: Tensor, kernel: str) -> Tensor:
    """Run one split kernel (``"triton"``, ``"ext"`` or ``"torch"``) on validated inputs."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if kernel == "triton":
        return _split_triton(hidden, gather_index)
    if kernel == "ext":
        _extension.load()
        return torch.ops.dpvr_C.route_split(hidden, gather_index)
    return _split_torch(hidden, gather_index)


@torch.library.custom_op("dpvr::route_split", mutates_args=())
def route_split_op(hidden: Tensor, gather_index: Tensor, merge_index: Tensor, num_text: int, kernel: str) -> Tensor:
    """Packed ``[T + V, D]`` = rows ``gather_index`` of ``hidden``. ``merge_index`` is for the backward."""
    return split_kernel(hidden, gather_index, kernel)


@route_split_op.register_fake
def _(hidden, gather_index, merge_index, num_text, kernel):
    return hidden.new_empty(gather_index.shape[0], hidden.shape[-1])


def _split_setup_context(ctx, inputs, output):
    hidden, gather_index, merge_index, num_text, kernel = inputs
    ctx.save_for_backward(merge_index, gather_index)
    ctx.shape = hidden.shape
    ctx.num_text = num_text
    ctx.kernel = kernel


def _split_backward(ctx, grad_packed):
    merge_index, gather_index = ctx.saved_tensors
    B, L, _ = ctx.shape
    T = ctx.num_text
    grad_packed = grad_packed.contiguous()
    # The gradient of a gather is a merge: each hidden row receives its packed row; pad rows get zero.
    grad_hidden = torch.ops.dpvr.fuse_merge(
        grad_packed[:T], grad_packed[T:], None, merge_index, gather_index, B, L, ctx.kernel
    )
    return grad_hidden, None, None, None, None


route_split_op.register_autograd(_split_backward, setup_context=_split_setup_context)


def check_hidden(name: str, hidden: Tensor, plan: RoutePlan) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor [B, L, D], got {getattr(hidden, 'shape', type(hidden))}")
    if not hidden.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {hidden.dtype}")
    if tuple(hidden.shape[:2]) != (plan.batch_size, plan.seq_len):
        raise ValueError(
            f"{name} has [B, L] = {list(hidden.shape[:2])} but the plan was built for "
            f"[{plan.batch_size}, {plan.seq_len}]: build the plan from this batch's masks"
        )
    if hidden.device != plan.device:
        raise ValueError(f"{name} is on {hidden.device} but the plan is on {plan.device}: build the plan on {hidden.device}")


def route_split(hidden: Tensor, plan: RoutePlan, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Split ``hidden`` ``[B, L, D]`` into the packed text stream ``[T, D]`` and vision stream ``[V, D]``.

    One kernel reads ``hidden`` once and writes both streams. Differentiable (the backward is a merge).
    """
    check_hidden("hidden", hidden, plan)
    kernel = resolve_backend(backend, hidden.device)
    packed = route_split_op(hidden, plan.gather_index, plan.merge_index, plan.num_text, kernel)
    return packed[: plan.num_text], packed[plan.num_text :]
