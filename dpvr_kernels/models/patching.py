"""patch / unpatch: turn a Hugging Face VLM of a supported class (``classes.py``) into its DPVR-LF form, in
place, and back; and the stock forward of a patched model (the distillation teacher).

The patch binds methods onto one model instance (nothing global changes but the registration of the
``"dpvr_varlen"`` attention function), and :func:`unpatch` removes them again, bit-exact.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from collections.abc import Iterator

from torch import nn

from ..config import DPVRConfig
from . import attention, classes, distributed
from .attention import ATTN_NAME
from .backbone import (
    SIDE_BRANCH,
    PatchState,
    attention_layer_types,
    check_backbone,
    language_model,
    patch_state,
)
from .checkpoint import load_saved_side_branch
from .forward import dpvr_language_forward, vision_wrapper_forward
from .generation import dpvr_generate, masks_for_generate

__all__ = ["is_patched", "keep_stock_fusion_layers", "keep_stock_weights", "patch", "stock_attention", "stock_forward", "unpatch"]


def patch(model: nn.Module, route_layer: int | None = None, fusion_layers: int = 1, backend: str = "auto") -> nn.Module:
    """Turn a Hugging Face LLaVA model into its DPVR-LF form, in place.

    Args:
        model: a model of a class in ``dpvr_kernels.models.classes.SUPPORTED`` (LLaVA, LLaVA-NeXT, NeXT-Video,
            OneVision, VipLLaVA) with a Llama-family backbone (RoPE; GQA and sliding windows allowed).
        route_layer: layer at which vision tokens leave for the side branch; ``None`` is
            ``round(N * 18 / 32)`` (18 for LLaVA-1.5-7B), or the value saved in ``config.dpvr``.
        fusion_layers: number of last layers that run on the fused full sequence (>= 1).
        backend: route/merge kernels: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        ``model`` itself. The side branch is ``model.model.language_model.dpvr_side_branch``; the
        settings are in ``model.config.dpvr``. :func:`unpatch` restores the stock model.
    """
    lm = language_model(model)
    check_backbone(lm)
    saved = getattr(model.config, "dpvr", None)
    if route_layer is None and saved:
        route_layer, fusion_layers = saved["route_layer"], saved.get("fusion_layers", fusion_layers)
    settings = DPVRConfig.resolve(len(lm.layers), route_layer, fusion_layers, backend)

    existing = getattr(lm, "_dpvr_state", None)
    if existing is not None:
        if existing.settings == settings:
            return model  # patching twice with the same settings is a no-op
        raise RuntimeError(
            f"model is already patched with {existing.settings}; call dpvr_kernels.unpatch(model) before "
            f"patching with {settings}"
        )

    attention.register()
    # The text stream and side branch get their own config view that selects the varlen attention.
    varlen_config = copy.copy(lm.config)
    varlen_config._attn_implementation_internal = ATTN_NAME
    layer_types, window = attention_layer_types(lm)
    row = classes.model_class(model)
    injected = classes.deepstack_layers(model, row)
    if settings.route_layer < injected:
        raise ValueError(
            f"route_layer={settings.route_layer}: {row.name} adds deepstack vision features to the vision tokens "
            f"after decoder layers 0..{injected - 1}, which the route at layer {settings.route_layer} would skip; "
            f"pass route_layer >= {injected}"
        )
    if window is not None and row.positions != "rope":
        raise NotImplementedError(
            f"{row.name} with sliding-window layers is not supported under DPVR-LF (a window over M-RoPE positions "
            "is not defined by one position per token); load it with use_sliding_window=False, or leave it stock"
        )
    state = PatchState(settings=settings, model_class=row, layer_types=layer_types,
                        window=window, user_attn=lm.config._attn_implementation or "eager",
                        varlen_config=varlen_config)
    r, f, n = settings.route_layer, settings.fusion_layers, len(lm.layers)

    side = distributed.copy_layer(model, lm, r)  # plain, tensor-parallel or offloaded layer r
    side.self_attn.config = varlen_config
    fits_saved = bool(saved) and (saved["route_layer"], saved.get("fusion_layers", 1)) == (r, settings.fusion_layers)
    if saved and not fits_saved:
        warnings.warn(
            f"dpvr_kernels: the saved side branch (config.dpvr) was trained for route layer {saved['route_layer']} "
            f"with {saved.get('fusion_layers', 1)} fusion layer(s); patching at route layer {r} with "
            f"{settings.fusion_layers} starts an untrained copy of layer {r} instead (patch(model) without "
            "route_layer uses the saved one)",
            RuntimeWarning,
            stacklevel=2,
        )
    elif saved and not load_saved_side_branch(model, side):
        warnings.warn(
            "dpvr_kernels: config.dpvr is set but no saved side-branch weights were found; the side branch "
            f"starts as a copy of layer {r}",
            RuntimeWarning,
            stacklevel=2,
        )
    lm.add_module(SIDE_BRANCH, side)
    for i in range(r, n - f):
        state.original_attn_configs[i] = lm.layers[i].self_attn.config
    lm._dpvr_state = state
    _bind(model, lm, state)
    model.config.dpvr = settings.to_dict()
    return model


def _bind(model: nn.Module, lm: nn.Module, state: PatchState) -> None:
    """Install the DPVR-LF forward on the instance: the methods, and the varlen attention of the deep layers."""
    for i in state.original_attn_configs:
        lm.layers[i].self_attn.config = state.varlen_config
    lm.forward = types.MethodType(dpvr_language_forward, lm)
    model.model.forward = types.MethodType(vision_wrapper_forward, model.model)
    model.generate = types.MethodType(dpvr_generate, model)
    model.create_masks_for_generate = types.MethodType(masks_for_generate, model)


def _unbind(model: nn.Module, lm: nn.Module, state: PatchState) -> None:
    """Undo :func:`_bind`: the class's own (stock) methods and attention configs again."""
    for i, cfg in state.original_attn_configs.items():
        lm.layers[i].self_attn.config = cfg
    for obj in (lm, model.model):
        obj.__dict__.pop("forward", None)
    for name in ("generate", "create_masks_for_generate"):
        model.__dict__.pop(name, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock forward of a patched model, bit-exact; removes the side branch and ``config.dpvr``."""
    lm = language_model(model)
    state: PatchState | None = getattr(lm, "_dpvr_state", None)
    if state is None:
        raise ValueError("model is not patched by dpvr_kernels (nothing to unpatch)")
    _unbind(model, lm, state)
    for module, _, buffer in state.stock_copies:
        delattr(module, buffer)
    delattr(lm, SIDE_BRANCH)
    del lm._dpvr_state
    if hasattr(model.config, "dpvr"):
        del model.config.dpvr
    return model


def is_patched(model: nn.Module) -> bool:
    """True when :func:`patch` has been applied to ``model``."""
    return patch_state(model) is not None


_STOCK_COPY = "dpvr_stock__"


def keep_stock_weights(model: nn.Module, modules: list[nn.Module]) -> int:
    """Keep frozen copies of ``modules``' parameters, which :func:`stock_forward` computes with.

    Call it before training stock weights (the fusion layers): the teacher of a distillation is the stock
    forward, and it must stay the *original* model while the student's fusion layers move. The copies are
    non-persistent buffers on the modules (they follow ``.to()`` and are left out of ``state_dict`` and saved
    folders); :func:`unpatch` drops them. Idempotent per module. Returns the number of elements kept.
    """
    lm = language_model(model)
    state: PatchState | None = getattr(lm, "_dpvr_state", None)
    if state is None:
        raise ValueError("keep_stock_weights needs a patched model: dpvr_kernels.patch(model) first")
    kept = {id(m) for m, _, _ in state.stock_copies}
    count = 0
    for module in modules:
        if id(module) in kept:
            continue
        for name, param in module.named_parameters():
            buffer = _STOCK_COPY + name.replace(".", "__")
            module.register_buffer(buffer, param.detach().clone(), persistent=False)
            state.stock_copies.append((module, name, buffer))
            count += param.numel()
    return count


def keep_stock_fusion_layers(model: nn.Module) -> int:
    """:func:`keep_stock_weights` of the fusion layers ``[N - f, N)``: call it before they train or load trained
    weights, so :func:`stock_forward` stays the original model. Returns the number of elements kept."""
    lm = language_model(model)
    state: PatchState | None = getattr(lm, "_dpvr_state", None)
    if state is None:
        raise ValueError("keep_stock_fusion_layers needs a patched model: dpvr_kernels.patch(model) first")
    return keep_stock_weights(model, list(lm.layers[len(lm.layers) - state.settings.fusion_layers :]))


@contextlib.contextmanager
def _stock_weights(state: PatchState) -> Iterator[None]:
    """Swap the kept stock copies into their parameters' storage for the block (autograd does not see it)."""
    swapped = []
    for module, name, buffer in state.stock_copies:
        param = module.get_parameter(name)
        swapped.append((param, param.data))
        param.data = getattr(module, buffer)
    try:
        yield
    finally:
        for param, data in swapped:
            param.data = data


@contextlib.contextmanager
def stock_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, a patched model computes its **stock** forward with the same weights (no second copy):
    the teacher of a side-branch distillation (at 7B a copy would be 14 GB more).

    Its logits are bit-equal to the unpatched model's; the side branch stays in the module tree (and in the
    optimizer) but is not called. Where stock weights train (the fusion layers, see
    :func:`keep_stock_weights`), the block computes with their original values, so the teacher stays the
    original model. On an unpatched model this does nothing. Not re-entrant across threads: the instance's
    methods are swapped for the duration of the block::

        with torch.no_grad(), dpvr_kernels.stock_forward(model):
            teacher_logits = model(**batch).logits
        student_logits = model(**batch).logits        # DPVR-LF again
    """
    if not is_patched(model):
        yield model
        return
    lm = language_model(model)
    state: PatchState = lm._dpvr_state
    _unbind(model, lm, state)
    try:
        with _stock_weights(state):
            yield model
    finally:
        _bind(model, lm, state)


@contextlib.contextmanager
def stock_attention(model: nn.Module):
    """Within the block, the deep layers use the user's attention implementation again (for the reference)."""
    lm = language_model(model)
    state: PatchState | None = getattr(lm, "_dpvr_state", None)
    if state is None:
        yield
        return
    attns = [lm.layers[i].self_attn for i in state.original_attn_configs] + [getattr(lm, SIDE_BRANCH).self_attn]
    for attn in attns:
        attn.config = lm.config
    try:
        yield
    finally:
        for attn in attns:
            attn.config = state.varlen_config
