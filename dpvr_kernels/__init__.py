"""dpvr-kernels: DPVR-LF (late-layer fusion) for Hugging Face LLaVA models.

``dpvr_kernels.patch(model)`` routes the image tokens at a middle layer into a one-layer side branch,
runs the deep layers on the text tokens alone (packed, varlen attention) and fuses both streams back at
the last layer. The README's Semantics section is the contract.
"""

from __future__ import annotations

import os

from torch import nn

from . import reference
from .assets import demo_model
from .config import DPVRConfig
from .flops import cost_model
from .models.cache import DPVRCache, DPVRStaticCache, kv_cache_bytes
from .models.describe import describe
from .models.patching import is_patched, patch, stock_forward, unpatch
from .ops import fuse_merge, route_split
from .plan import RoutePlan, build_route_plan, build_route_plan_from_mask
from .training import answer_kl, distill_side_branch, distillation_loss, mark_trainable


def load_side_branch(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Patch ``model`` with a ``--side-branch-only`` distill output (:func:`dpvr_kernels.distill.load_side_branch`;
    imported on first use, since it pulls in the Trainer)."""
    from .distill import load_side_branch as load

    return load(model, path)


__version__ = "0.1.0"

__all__ = [
    "DPVRCache",
    "DPVRConfig",
    "DPVRStaticCache",
    "RoutePlan",
    "answer_kl",
    "cost_model",
    "demo_model",
    "describe",
    "distill_side_branch",
    "distillation_loss",
    "is_patched",
    "kv_cache_bytes",
    "load_side_branch",
    "mark_trainable",
    "patch",
    "reference",
    "stock_forward",
    "unpatch",
    "build_route_plan",
    "build_route_plan_from_mask",
    "fuse_merge",
    "route_split",
]
