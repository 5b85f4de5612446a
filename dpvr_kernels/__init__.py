"""dpvr-kernels: DPVR-LF (late-layer fusion) for Hugging Face LLaVA models.

``dpvr_kernels.patch(model)`` routes the image tokens at a middle layer into a one-layer side branch,
runs the deep layers on the text tokens alone (packed, varlen attention) and fuses both streams back at
the last layer. See DESIGN.md for the exact semantics.
"""

from . import reference
from .config import DPVRConfig
from .flops import cost_model
from .models.cache import DPVRCache, DPVRStaticCache, kv_cache_bytes
from .models.llava import describe, is_patched, patch, unpatch
from .ops import fuse_merge, route_split
from .plan import RoutePlan, build_route_plan, build_route_plan_from_mask
from .training import distill_side_branch, distillation_loss, mark_trainable

__version__ = "0.1.0"

__all__ = [
    "DPVRCache",
    "DPVRConfig",
    "DPVRStaticCache",
    "RoutePlan",
    "cost_model",
    "describe",
    "distill_side_branch",
    "distillation_loss",
    "is_patched",
    "kv_cache_bytes",
    "mark_trainable",
    "patch",
    "reference",
    "unpatch",
    "build_route_plan",
    "build_route_plan_from_mask",
    "fuse_merge",
    "route_split",
]
