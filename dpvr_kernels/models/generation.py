"""``generate`` under DPVR-LF: which decoding modes and caches it supports, and the static cache's sizes (every
token for the layers that see every token, the longest text stream for the deep layers)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, StaticCache

from . import classes
from .backbone import CACHE_KW, PatchState, patch_state
from .cache import DPVRStaticCache, is_dpvr_cache

__all__ = ["dpvr_generate", "masks_for_generate", "text_static_cache"]


def dpvr_generate(self, *args, **kwargs):
    """model.generate under DPVR-LF: the decoding modes whose cache handling it supports."""
    gen_cfg = kwargs.get("generation_config") or self.generation_config
    num_beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
    if num_beams > 1:
        raise NotImplementedError(
            "beam search is not supported under DPVR-LF (its cache reordering does not know the text-only "
            "deep-layer cache); use greedy or sampling (num_beams=1), or dpvr_kernels.unpatch(model)"
        )
    for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if kwargs.get(name) is not None or getattr(gen_cfg, name, None) is not None:
            raise NotImplementedError(f"{name} (assisted decoding) is not supported under DPVR-LF; unpatch first")
    impl = kwargs.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
    if impl not in (None, "dynamic", "static"):
        raise NotImplementedError(
            f"cache_implementation={impl!r} is not supported under DPVR-LF: the deep layers hold a text-only "
            "cache of another length; use the default dynamic cache or cache_implementation='static'"
        )
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not is_dpvr_cache(cache) and type(cache) not in (DynamicCache, StaticCache):
        raise NotImplementedError(
            f"{type(cache).__name__} is not supported under DPVR-LF; pass a DynamicCache or StaticCache, none, or "
            "cache_implementation='static'"
        )
    if impl == "static" and cache is None:
        # generate refuses a cache together with a cache_implementation, wherever it is named: the call, the
        # generation_config passed, or the model's own (which generate merges into the one passed).
        kwargs.pop("cache_implementation", None)
        if getattr(gen_cfg, "cache_implementation", None) is not None:
            gen_cfg = copy.deepcopy(gen_cfg)
            gen_cfg.cache_implementation = None
            kwargs["generation_config"] = gen_cfg
        kwargs[CACHE_KW] = _static_cache_for(self, gen_cfg, args, kwargs)
        own, self.generation_config.cache_implementation = self.generation_config.cache_implementation, None
        try:
            return type(self).generate(self, *args, **kwargs)
        finally:
            self.generation_config.cache_implementation = own
    return type(self).generate(self, *args, **kwargs)


def masks_for_generate(self, attention_mask=None, cache=None, **kwargs):
    """generate() turns the 2-D mask into 4-D masks up front for a static cache; DPVR-LF routes by the 2-D mask
    and builds each layer's mask itself, so it keeps the 2-D one. In decode steps over a static cache the mask is
    zero-padded to the cache's capacity, as stock's 4-D masks are: every step then has the same shapes, so a
    compiled step (and its CUDA graph) is reused instead of re-made for each new length."""
    cache = cache if cache is not None else kwargs.get("past_key_values")
    if attention_mask is None or not isinstance(cache, DPVRStaticCache) or not cache.dpvr_filled:
        return attention_mask
    capacity = cache.layers[cache.dpvr_full_layer].max_cache_len
    return torch.nn.functional.pad(attention_mask, (0, capacity - attention_mask.shape[1]))


def _static_cache_sizes(model: nn.Module, prompt: Tensor, attention_mask: Tensor | None, fed: int,
                        vision_inputs: dict) -> tuple[int, int]:
    """``(capacity of the layers that hold every token, capacity of the deep layers)`` for ``prompt`` and ``fed``
    tokens fed after it (one host sync)."""
    state: PatchState = patch_state(model)
    batch, length = prompt.shape[:2]
    text = (torch.ones(batch, length, dtype=torch.bool, device=prompt.device) if attention_mask is None
            else attention_mask.bool())
    carried = classes.carried_inputs(state.model_class, vision_inputs)
    if carried and not prompt.is_floating_point():  # ids (embeddings carry no ids: every slot counts as text)
        text = text & ~classes.vision_mask(model.model, carried, prompt, None)
    return length + fed, int(text.sum(1).max()) + fed


def text_static_cache(model: nn.Module, prompt: Tensor, attention_mask: Tensor | None, fed: int,
                      vision_inputs: dict) -> DPVRStaticCache:
    """A static cache for ``prompt`` (``input_ids`` or ``inputs_embeds``) and ``fed`` tokens fed after it: every
    token for the layers that hold every token, the longest text stream + ``fed`` for the deep layers (one host
    sync). Vision tokens are those of the inputs ``vision_inputs`` carries (e.g. ``pixel_values``)."""
    return _new_static_cache(model, *_static_cache_sizes(model, prompt, attention_mask, fed, vision_inputs))


def _new_static_cache(model: nn.Module, full: int, text: int) -> DPVRStaticCache:
    settings = patch_state(model).settings
    return DPVRStaticCache(config=model.config, max_cache_len=full, text_cache_len=text,
                           route_layer=settings.route_layer, fusion_layers=settings.fusion_layers)


def _reusable(cache: DPVRStaticCache, batch: int, full: int, text: int, param: Tensor) -> bool:
    """Whether ``generate``'s previous static cache can serve this call (as stock reuses its own): the same batch,
    dtype and device, and room for at least this prompt and these new tokens in both kinds of layer."""
    full_layer, deep_layer = cache.layers[cache.dpvr_full_layer], cache.layers[cache.dpvr_deep_layer]
    if full_layer.max_cache_len < full or deep_layer.max_cache_len < text:
        return False
    keys = getattr(full_layer, "keys", None)
    return keys is None or (keys.shape[0] == batch and keys.dtype == param.dtype and keys.device == param.device)


def _static_cache_for(model: nn.Module, gen_cfg, args: tuple, kwargs: dict) -> DPVRStaticCache:
    """The static cache of one generate call, sized as stock sizes it: prompt + new tokens - 1 (the last new
    token is never fed back), the deep layers for text only. A previous call's cache that is large enough is
    reset and reused, as stock does: the compiled decode step (and its CUDA graphs) stays valid."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if prompt is None:
        raise ValueError("generate(cache_implementation='static') under DPVR-LF needs input_ids or inputs_embeds")
    max_new = kwargs.get("max_new_tokens", getattr(gen_cfg, "max_new_tokens", None))
    if max_new is None:
        max_new = kwargs.get("max_length", gen_cfg.max_length) - prompt.shape[1]
    state: PatchState = patch_state(model)
    full, text = _static_cache_sizes(model, prompt, kwargs.get("attention_mask"), max_new - 1, kwargs)
    cache = state.static_cache
    if cache is not None and _reusable(cache, prompt.shape[0], full, text, next(model.parameters())):
        cache.reset()
        return cache
    state.static_cache = _new_static_cache(model, full, text)
    return state.static_cache
