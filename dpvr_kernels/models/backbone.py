"""What every part of the DPVR-LF patch shares: where the decoder is, how a decoder layer is called, the patch's
per-instance state, and the names the patch adds to a model.

A supported class (``classes.py``) has its decoder at ``model.model.language_model``: a Llama-style stack of
``layers`` with rotary embeddings. The semantics the patch implements are in ``docs/CONTRACT.md``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import Tensor, nn
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..config import DPVRConfig
from . import classes

__all__ = [
    "CACHE_KW",
    "SIDE_BRANCH",
    "VISION_MASK_KW",
    "PatchState",
    "attention_layer_types",
    "check_backbone",
    "language_model",
    "layer_call",
    "patch_state",
    "side_branch",
    "wrapper_state",
]

SIDE_BRANCH = "dpvr_side_branch"

# The vision mask of a LLaVA call that carries images travels from the LlavaModel wrapper (which sees input_ids
# and pixel_values) to the language model forward (which sees embeddings only) as this keyword argument:
# stock LlavaModel.forward passes its **kwargs through. No global state, so compiled code traces it.
VISION_MASK_KW = "dpvr_vision_mask"

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; follow whichever is installed.
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
MASK_TAKES_LAYER_IDX = "layer_idx" in inspect.signature(create_causal_mask).parameters


@dataclass
class PatchState:
    """What patch() changed on the instance, so that unpatch() can put it back."""

    settings: DPVRConfig
    model_class: classes.ModelClass
    layer_types: tuple[str, ...]
    """Attention type of each decoder layer ("full_attention" or "sliding_attention"), as transformers infers it."""
    window: int | None
    """The sliding window of the sliding layers; None when every layer is full attention."""
    user_attn: str
    varlen_config: object
    original_attn_configs: dict[int, object] = field(default_factory=dict)
    static_cache: object | None = None
    """The ``DPVRStaticCache`` of the last ``generate(cache_implementation="static")``, reused while it fits."""
    stock_copies: list[tuple[nn.Module, str, str]] = field(default_factory=list)
    """(module, parameter name, buffer name): frozen copies of stock weights that training changes (the fusion
    layers), which :func:`stock_forward` swaps in; see :func:`keep_stock_weights`."""


def language_model(model: nn.Module) -> nn.Module:
    """The decoder of a supported model (``model.model.<row.decoder>``); a clear error for any other model."""
    row = classes.model_class(model)
    lm = getattr(getattr(model, "model", None), row.decoder, None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(
            f"{type(model).__name__} has no decoder at model.model.{row.decoder}.layers (a modified class?); "
            "DPVR-LF patches the stock layout of the Hugging Face classes"
        )
    return lm


def wrapper_state(inner: nn.Module | None) -> PatchState | None:
    """The patch's state, from the multimodal wrapper ``model.model``; None when it is not patched."""
    for name in {row.decoder for row in classes.SUPPORTED.values()}:
        state = getattr(getattr(inner, name, None), "_dpvr_state", None)
        if state is not None:
            return state
    return None


def patch_state(model: nn.Module) -> PatchState | None:
    """The patch's state of ``model``, None when it is not patched (or not a model the patch knows)."""
    return wrapper_state(getattr(model, "model", None))


def side_branch(model: nn.Module) -> nn.Module:
    """The side branch of a patched model (a decoder layer, in the decoder's module tree)."""
    lm = language_model(model)
    if not hasattr(lm, SIDE_BRANCH):
        raise ValueError(f"{type(model).__name__} is not patched: no side branch; call dpvr_kernels.patch(model)")
    return getattr(lm, SIDE_BRANCH)


def check_backbone(lm: nn.Module) -> None:
    if not hasattr(lm, "rotary_emb"):
        raise ValueError(
            f"{type(lm).__name__} has no rotary position embeddings (rotary_emb): DPVR-LF keeps each token's "
            "original position through RoPE; use a Llama-family backbone (Llama/Vicuna, Mistral, Qwen2)"
        )


def attention_layer_types(lm: nn.Module) -> tuple[tuple[str, ...], int | None]:
    """Each decoder layer's attention type and the sliding window, as transformers' caches infer them."""
    types_, kwargs = get_layer_types_and_kwargs(lm.config)
    windows = {kw["sliding_window"] for t, kw in zip(types_, kwargs, strict=True) if t == "sliding_attention"}
    unknown = set(types_) - {"full_attention", "sliding_attention"}
    if unknown or len(windows) > 1:
        raise NotImplementedError(
            f"layer types {sorted(set(types_))} with windows {sorted(windows)} are not supported under DPVR-LF "
            "(full attention and one sliding window are); leave this model stock"
        )
    return tuple(types_), next(iter(windows), None)


def layer_call(layer: nn.Module, hidden: Tensor, cache, **kw) -> Tensor:
    out = layer(hidden, **{CACHE_KW: cache}, **kw)
    return out[0] if isinstance(out, tuple) else out
