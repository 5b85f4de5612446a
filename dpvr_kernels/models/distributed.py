"""The side branch beyond one device: tensor parallelism (HF ``tp_plan``), accelerate ``device_map``/offload,
and the rank layouts the patch refuses.

``patch()`` makes the side branch with :func:`copy_layer` and loads saved weights with :func:`load_side_branch_state`.

* Plain model: a deep copy of layer ``r``.
* Tensor parallel (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``): the parameters of layer ``r`` are
  DTensors, which ``copy.deepcopy`` cannot copy. Each rank clones its local shards (same mesh and placements, no
  communication), and the parallel styles of the model's TP plan are installed again on the copy's submodules
  (a deep copy would keep forwards bound to layer ``r``'s modules). Varlen attention then runs on the local heads,
  and the route kernels on the replicated hidden states between layers.
* accelerate hooks (``device_map`` with offload to CPU or disk, ``cpu_offload``): layer ``r``'s weights may live on
  the ``meta`` device with the real values in the hook's weights map. The side branch is trained and saved, so it is
  a plain module with real weights on layer ``r``'s execution device, with a hook that moves its inputs there and
  its output back.
"""

from __future__ import annotations

import contextlib
import copy
import re

import torch
from torch import Tensor, nn

_SUPPORTED = (
    "DPVR-LF supports one process, HF tensor parallelism (from_pretrained(..., tp_plan='auto') under torchrun), "
    "accelerate device_map/offload, and data-parallel training of the side branch (DDP, or FSDP2 fully_shard "
    "applied after dpvr_kernels.patch); see README 'Several GPUs'"
)


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _is_dtensor(t: object) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _mesh_sizes(model: nn.Module) -> dict[str, int]:
    mesh = getattr(model, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None)
    if mesh is None or not names:
        return {}
    return {name: int(size) for name, size in zip(names, mesh.shape, strict=True)}


def check_layout(model: nn.Module, lm: nn.Module) -> None:
    """Raise a clear error for a rank layout the patch cannot serve (pipeline stages, sequence/context parallel,
    FSDP applied before the patch).

    Args:
        model: the ``LlavaForConditionalGeneration`` given to ``patch()``.
        lm: its decoder (``model.model.language_model``).

    Raises:
        NotImplementedError: naming the layout and what works instead.
    """
    sizes = _mesh_sizes(model)
    identity_layers = [i for i, layer in enumerate(lm.layers) if type(layer).__name__ == "PipelineIdentityLayer"]
    if sizes.get("pp", 1) > 1 or getattr(model, "_pp_stage", None) is not None or identity_layers:
        raise NotImplementedError(
            f"pipeline parallelism (pp_size={sizes.get('pp', '?')}; decoder layers {identity_layers[:4]}... live on "
            "other ranks) is not supported under DPVR-LF: the route layer, the side branch and the fusion layers must "
            f"be in one process. Load with pp_size=1 (e.g. tp_plan='auto' alone). {_SUPPORTED}"
        )
    for dim in ("cp", "sp", "context", "sequence"):
        if sizes.get(dim, 1) > 1:
            raise NotImplementedError(
                f"context/sequence parallelism (device mesh dimension {dim!r} of size {sizes[dim]}) is not "
                f"supported under DPVR-LF: routing needs every token of a sample in one process. {_SUPPORTED}"
            )
    plan = getattr(model, "_tp_plan", None) or {}
    sequence_rules = sorted(k for k, v in plan.items() if "sequence" in str(v))
    if sequence_rules:
        raise NotImplementedError(
            f"sequence-parallel TP rules ({', '.join(sequence_rules[:3])}) are not supported under DPVR-LF: the route "
            f"kernels need the full sequence on every TP rank; use tp_plan='auto' without sequence_parallel rules. "
            f"{_SUPPORTED}"
        )
    if sizes.get("fsdp", 1) > 1 or sizes.get("dp_replicate", 1) > 1 or _is_fsdp(lm):
        raise NotImplementedError(
            "this model is already sharded with FSDP (from_pretrained(..., distributed_config with fsdp_size > 1), or "
            "fully_shard before patching), and the side branch cannot be copied from sharded parameters: load the model "
            "without FSDP, call dpvr_kernels.patch(model), then apply fully_shard (or let the HF Trainer/accelerate "
            f"do it). {_SUPPORTED}"
        )


def _is_fsdp(module: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in module.modules())


def _accelerate_hooks(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if getattr(m, "_hf_hook", None) is not None]


def _qualified_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _tp_style(model: nn.Module, full_name: str):
    """The parallel style that the model's TP plan gives the module ``full_name``, or None."""
    for key, style_name in (getattr(model, "_tp_plan", None) or {}).items():
        pattern = re.escape(key).replace(r"\*", r"\d+")
        if re.fullmatch(pattern, full_name):
            from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

            return ALL_PARALLEL_STYLES[style_name]
    return None


def _deep_copy(layer: nn.Module, replace: dict[int, object]) -> nn.Module:
    """``copy.deepcopy(layer)`` with the objects of ``replace`` (by id) substituted, and every per-instance forward
    and accelerate hook dropped from the copy (they would still call into ``layer``'s modules)."""
    memo = dict(replace)
    side = copy.deepcopy(layer, memo)
    for module in side.modules():
        for attr in ("forward", "_hf_hook", "_old_forward"):
            module.__dict__.pop(attr, None)
    return side


def _copy_tensor_parallel(model: nn.Module, lm: nn.Module, layer: nn.Module, layer_idx: int) -> nn.Module:
    replace: dict[int, object] = {}
    for p in layer.parameters():
        clone = p.detach().clone()  # a DTensor clones its local shard: same mesh and placements, no communication
        replace[id(p)] = nn.Parameter(clone, requires_grad=p.requires_grad)
        if _is_dtensor(p):
            replace[id(p.device_mesh)] = p.device_mesh
    for b in layer.buffers():
        replace[id(b)] = b.detach().clone()
    hooked = [name for name, m in layer.named_modules() if "forward" in m.__dict__]
    side = _deep_copy(layer, replace)
    prefix = f"{_qualified_name(model, lm)}.layers.{layer_idx}"
    for name in hooked:
        full = f"{prefix}.{name}" if name else prefix
        style = _tp_style(model, full)
        module = side.get_submodule(name)
        meshes = [p.device_mesh for p in module.parameters() if _is_dtensor(p)]
        if style is None or not meshes:
            raise NotImplementedError(
                f"{full} has a forward hook that the model's TP plan does not explain, so the side branch cannot "
                f"reproduce it; use tp_plan='auto' (or a plan of colwise/rowwise rules on the decoder layers). {_SUPPORTED}"
            )
        style.install_forward(module, meshes[0])
        module._is_hooked = True
    return side


def _execution_device(layer: nn.Module) -> torch.device:
    for module in _accelerate_hooks(layer):
        device = getattr(module._hf_hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(p.device for p in layer.parameters() if p.device.type != "meta")


def _copy_offloaded(layer: nn.Module) -> nn.Module:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import align_module_device

    device = _execution_device(layer)
    replace: dict[int, object] = {}
    with contextlib.ExitStack() as stack:
        for module in layer.modules():  # onload offloaded weights (meta -> real) for the time of the copy
            stack.enter_context(align_module_device(module, device))
        # by name: onloading swaps the parameter objects
        real = {n: t.detach().to(device, copy=True) for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    for name, p in layer.named_parameters():
        replace[id(p)] = nn.Parameter(real[name], requires_grad=p.requires_grad)
    for name, b in layer.named_buffers():
        replace[id(b)] = real[name]
    for module in _accelerate_hooks(layer):
        replace[id(module._hf_hook)] = None  # not deep-copied (its weights map may hold the whole model)
    side = _deep_copy(layer, replace)
    # Its inputs come from layer r-1's device, its output goes back there (fuse_merge); no offload: it trains.
    add_hook_to_module(side, AlignDevicesHook(execution_device=device, io_same_device=True))
    return side


def copy_layer(model: nn.Module, lm: nn.Module, layer_idx: int) -> nn.Module:
    """The side branch's initial module: layer ``layer_idx`` of ``lm`` copied with its weights, laid out like it.

    Args:
        model: the model being patched (its TP plan and device mesh are read from it).
        lm: its decoder.
        layer_idx: the route layer ``r``.

    Returns:
        A new decoder layer with layer ``r``'s weights: a deep copy on one device; under tensor parallelism a copy
        with DTensor shards like layer ``r``'s and the same parallel forwards; under accelerate offload a plain module
        with real weights on layer ``r``'s execution device.
    """
    check_layout(model, lm)
    layer = lm.layers[layer_idx]
    if any(_is_dtensor(t) for t in [*layer.parameters(), *layer.buffers()]):
        return _copy_tensor_parallel(model, lm, layer, layer_idx)
    if _accelerate_hooks(layer):
        return _copy_offloaded(layer)
    return copy.deepcopy(layer)


def load_side_branch_state(side: nn.Module, state: dict[str, Tensor]) -> None:
    """Load full (unsharded) tensors into the side branch, ``strict`` like ``load_state_dict``.

    A DTensor parameter takes this rank's shard of the full tensor (every rank holds the full file, so
    no communication); a plain one the tensor itself, cast to its device and dtype.
    """
    own = dict(side.named_parameters()) | dict(side.named_buffers())
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"saved side-branch weights do not fit the side branch (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}): the checkpoint was saved from another model; patch a model of the saved shapes"
        )
    with torch.no_grad():
        for name, target in own.items():
            value = state[name].to(dtype=target.dtype)
            if _is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                          src_data_rank=None)
            else:
                value = value.to(target.device)
            target.copy_(value)


def local_kv_heads(layer: nn.Module, num_kv_heads: int, head_dim: int) -> int:
    """Key/value heads of ``layer`` in this process: ``num_kv_heads``, or this rank's share under tensor parallelism."""
    weight = getattr(getattr(getattr(layer, "self_attn", None), "k_proj", None), "weight", None)
    if weight is not None and _is_dtensor(weight):
        return weight.to_local().shape[0] // head_dim
    return num_kv_heads


def to_device(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` on ``device`` (``None`` kept); a no-op for tensors already there (one device, tensor parallel)."""
    return tuple(t if t is None or t.device == device else t.to(device) for t in tensors)
