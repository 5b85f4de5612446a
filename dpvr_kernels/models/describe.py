"""A short, readable report of what the patch did to a model and which kernels run."""

from __future__ import annotations

from torch import nn

from . import attention
from .attention import ATTN_NAME
from .backbone import PatchState, language_model
from .patching import is_patched

__all__ = ["describe"]


def describe(model: nn.Module) -> str:
    """A short report: route layer, streams' kernels and attention paths, fallbacks taken."""
    from ..ops import _extension
    from ..ops.backends import resolve_backend

    if not is_patched(model):
        return f"{type(model).__name__}: not patched (stock forward)"
    lm = language_model(model)
    state: PatchState = lm._dpvr_state
    p = next(lm.parameters())
    n = len(lm.layers)
    r, f = state.settings.route_layer, state.settings.fusion_layers
    kernel = resolve_backend(state.settings.backend, p.device)
    kernel_name = {"ext": f"compiled extension ({p.device.type})", "triton": "Triton", "torch": "torch indexing"}[kernel]
    lines = [
        f"DPVR-LF on {type(model).__name__} ({type(lm).__name__}, {n} layers, {p.dtype}, {p.device})",
        f"  layers [0, {r}): full sequence, attention '{state.user_attn}'",
        f"  side branch: copy of layer {r} on vision tokens, attention '{ATTN_NAME}' via "
        f"{attention.varlen_backend(p.device, p.dtype)}",
        f"  layers [{r}, {n - f}): text tokens only, attention '{ATTN_NAME}' via "
        f"{attention.varlen_backend(p.device, p.dtype)}; KV cache (DPVRCache) holds text only",
        f"  layers [{n - f}, {n}): fused full sequence, attention '{state.user_attn}'",
        f"  route_split/fuse_merge: backend={state.settings.backend!r} -> {kernel_name}",
    ]
    if not _extension.available():
        lines.append(f"  fallback: compiled extension unavailable ({_extension.unavailable_reason()})")
    if p.device.type == "cuda" and attention._flash_attn_varlen() is None:
        lines.append("  fallback: flash-attn not installed; torch varlen_attn / SDPA per segment used")
    return "\n".join(lines)
