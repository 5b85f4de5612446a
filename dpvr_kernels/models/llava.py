"""DPVR-LF for the Hugging Face LLaVA family (see ``classes.py`` for the model classes): patch, the routed
forward, unpatch.

The patch binds methods onto one model instance (nothing global changes but the registration of the
``"dpvr_varlen"`` attention function), and :func:`unpatch` removes them again, bit-exact.

Data flow of a prefill (DESIGN §4)::

    embeds ─ layers[0, r) ─ route_split ─ text  ─ layers[r, N-f) (varlen) ─┐
                                     └─ image ─ side branch (varlen)    ─ fuse_merge ─ layers[N-f, N) ─ norm

Decode steps carry text tokens only: layers [r, N-f) attend over their text-only cache with a mask.
A token is routed as vision (image or video) only where the call carries vision features for it
(``pixel_values``, ``pixel_values_videos``), as stock embeds it; in a call without them (every decode step) a
placeholder id is an ordinary token. Sliding-window backbones keep their window over original positions
everywhere (DESIGN §2.6; ``attention.py``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, StaticCache, get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..config import DPVRConfig
from ..ops import fuse_merge, route_split
from ..plan import build_route_plan_from_mask, packed_sequence_ids, sequence_ids_from_cu_seqlens
from ..vision_tokens import tokens_per_image
from . import attention, classes, distributed
from .attention import ATTN_NAME, VarlenSegments
from .cache import DPVRCache, DPVRStaticCache, TextCacheWriter, adopt_cache, deep_decode_mask, is_dpvr_cache

SIDE_BRANCH = "dpvr_side_branch"

# The vision mask of a LLaVA call that carries images travels from the LlavaModel wrapper (which sees input_ids
# and pixel_values) to the language model forward (which sees embeddings only) as this keyword argument:
# stock LlavaModel.forward passes its **kwargs through. No global state, so compiled code traces it.
VISION_MASK_KW = "dpvr_vision_mask"

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; follow whichever is installed.
_CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_TAKES_LAYER_IDX = "layer_idx" in inspect.signature(create_causal_mask).parameters


@dataclass
class _PatchState:
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
    stock_copies: list[tuple[nn.Module, str, str]] = field(default_factory=list)
    """(module, parameter name, buffer name): frozen copies of stock weights that training changes (the fusion
    layers), which :func:`stock_forward` swaps in; see :func:`keep_stock_weights`."""


# --------------------------------------------------------------------------------------------- forward


def _layer_call(layer: nn.Module, hidden: Tensor, cache, **kw) -> Tensor:
    out = layer(hidden, **{_CACHE_KW: cache}, **kw)
    return out[0] if isinstance(out, tuple) else out


def _full_masks(lm, inputs_embeds: Tensor, attention_mask: Tensor | None, cache, position_ids: Tensor) -> dict:
    """The stock masks of the layers that see every token, per attention type (as the stock decoder makes them)."""
    kw = {"config": lm.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
          _CACHE_KW: cache, "position_ids": position_ids}
    if _MASK_TAKES_LAYER_IDX:
        kw["layer_idx"] = len(lm.layers) - 1  # a fusion layer: its cache holds every token
    masks = {"full_attention": create_causal_mask(**kw)}
    if lm._dpvr_state.window is not None:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return masks


def _window_error(span: int, window: int) -> ValueError:
    return ValueError(
        f"the sliding window ({window} positions) binds in this batch (positions span {span}), and DPVR-LF's "
        "text-only KV cache cannot apply a window over original positions. Run this batch without a cache "
        "(use_cache=False; the prefill is exact with the window), keep prompt + new tokens within the window, "
        "or call dpvr_kernels.unpatch(model)"
    )


def _route_forward(lm, hidden: Tensor, image_mask: Tensor, attention_mask, position_ids: Tensor, sequence_ids,
                   cache: DPVRCache | None, use_cache: bool, layer_kwargs: dict) -> Tensor:
    """Prefill of layers [r, N-f): route, run the text stream and the side branch, fuse."""
    state: _PatchState = lm._dpvr_state
    r, f = state.settings.route_layer, state.settings.fusion_layers
    backend = state.settings.backend
    # Under a device_map the route layer's output may sit on another device than the masks: route there.
    image_mask, attention_mask, position_ids, sequence_ids = distributed.to_device(
        hidden.device, image_mask, attention_mask, position_ids, sequence_ids)
    plan = build_route_plan_from_mask(image_mask, attention_mask, position_ids, sequence_ids)
    if cache is not None and state.window is not None and plan.position_span >= state.window:
        raise _window_error(plan.position_span, state.window)
    text, image = route_split(hidden, plan, backend=backend)
    deep = range(r, len(lm.layers) - f)
    text_cache = TextCacheWriter(cache, plan) if cache is not None else None

    if plan.num_text:
        text_pos = plan.text_position_ids[None]
        segments = VarlenSegments(plan.text_cu_seqlens, plan.text_seqlens, plan.max_text_len, plan.text_position_ids,
                                  plan.position_span)
        text = text[None]
        pe = lm.rotary_emb(text, text_pos)
        for i in deep:
            text = _layer_call(lm.layers[i], text, text_cache, attention_mask=None, position_embeddings=pe,
                               position_ids=text_pos, use_cache=use_cache, dpvr_segments=segments, **layer_kwargs)
        text = text[0].to(hidden.device)  # a device_map may have put the last deep layer elsewhere
    elif text_cache is not None:
        # No text token in the batch (image-only prompts): the deep layers have nothing to run, but their
        # cache must exist (with zero prompt slots) for the decode steps to append to.
        cfg = lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for i in deep:
            heads = distributed.local_kv_heads(lm.layers[i], cfg.num_key_value_heads, head_dim)
            text_cache.fill_empty(i, heads, head_dim, hidden.dtype, hidden.device)

    if plan.num_image:
        image_pos = plan.image_position_ids[None]
        segments = VarlenSegments(plan.image_cu_seqlens, plan.image_seqlens, plan.max_image_len,
                                  plan.image_position_ids, plan.position_span)
        image = image[None]
        pe = lm.rotary_emb(image, image_pos)
        image = _layer_call(getattr(lm, SIDE_BRANCH), image, None, attention_mask=None, position_embeddings=pe,
                            position_ids=image_pos, use_cache=False, dpvr_segments=segments, **layer_kwargs)[0]
    return fuse_merge(text, image, hidden, plan, backend=backend)


def _prefill_sequence_ids(attention_mask: Tensor | None, position_ids: Tensor | None, cache, batch: int,
                          q_len: int, kwargs: dict) -> Tensor | None:
    """Sequences of padding-free packed rows, where stock keeps them apart; None for one sequence per row.

    Stock separates packed sequences when flash-attn's ``cu_seq_lens_q`` is passed, or (its masks) when
    ``position_ids`` restart inside a row and neither a 2-D attention mask nor a cache is used.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        if cache is not None or batch != 1:
            raise ValueError(
                "padding-free packed rows (cu_seq_lens_q) are routed per sequence, which needs one row (B=1) and "
                "no KV cache: call the model with use_cache=False, as DataCollatorWithFlattening training does"
            )
        return sequence_ids_from_cu_seqlens(cu_seqlens, q_len)
    if attention_mask is None and cache is None and position_ids is not None:
        return packed_sequence_ids(position_ids.expand(batch, q_len))
    return None


def dpvr_language_forward(
    self,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """The decoder forward under DPVR-LF (bound onto ``model.model.language_model`` by :func:`patch`)."""
    state: _PatchState = self._dpvr_state
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, None) or getattr(self.config, flag, False):
            raise NotImplementedError(
                f"{flag}=True is not supported by the DPVR-LF forward (image tokens skip the deep layers, so "
                "per-layer tensors have different token sets); call dpvr_kernels.unpatch(model) to inspect them"
            )
    kwargs.pop("return_dict", None)
    image_mask = kwargs.pop(VISION_MASK_KW, None)  # None: no vision features in this call, every token is text
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"DPVR-LF needs a 2-D attention_mask [B, L] (1 = token, 0 = pad) to route tokens; got "
            f"{attention_mask.dim()}-D. Pass the tokenizer's mask instead of a prepared 4-D mask."
        )

    if use_cache is None:
        use_cache = self.config.use_cache
    num_layers = len(self.layers)
    r, f = state.settings.route_layer, state.settings.fusion_layers
    if use_cache and cache is None:
        cache = DPVRCache(config=self.config)
    if cache is not None:
        cache = adopt_cache(cache, full_layer=num_layers - 1, deep_layer=r)
    batch, q_len = inputs_embeds.shape[:2]
    # Prefill or decode step is host-side state of the cache: no device sync, no branch on tensor values.
    prefill = cache is None or not cache.dpvr_filled
    past = cache.get_seq_length() if cache is not None else 0  # an int, or a tensor for a static cache
    explicit_positions = position_ids
    if position_ids is None:
        position_ids = (torch.arange(q_len, device=inputs_embeds.device) + past).unsqueeze(0)

    if not prefill and state.window is not None and isinstance(past, int) and past + q_len > state.window:
        raise _window_error(past + q_len - 1, state.window)
    masks = _full_masks(self, inputs_embeds, attention_mask, cache, position_ids)
    pe = self.rotary_emb(inputs_embeds, position_ids)
    common = dict(position_embeddings=pe, position_ids=position_ids, use_cache=use_cache, **kwargs)
    hidden = inputs_embeds
    for i in range(r):
        hidden = _layer_call(self.layers[i], hidden, cache, attention_mask=masks[state.layer_types[i]], **common)

    if prefill:
        if image_mask is None:
            image_mask = torch.zeros(batch, q_len, dtype=torch.bool, device=inputs_embeds.device)
        sequence_ids = _prefill_sequence_ids(attention_mask, explicit_positions, cache, batch, q_len, kwargs)
        hidden = _route_forward(self, hidden, image_mask, attention_mask, position_ids, sequence_ids, cache,
                                use_cache, kwargs)
    else:
        deep_mask = deep_decode_mask(cache, attention_mask, q_len, batch, inputs_embeds.device)
        for layer in self.layers[r : num_layers - f]:
            hidden = _layer_call(layer, hidden, cache, attention_mask=deep_mask, **common)

    for i in range(num_layers - f, num_layers):
        hidden = _layer_call(self.layers[i], hidden, cache, attention_mask=masks[state.layer_types[i]], **common)
    hidden = self.norm(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_KW: cache})


@functools.cache
def _forward_params(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s parameters after ``self`` and ``input_ids`` (what positional args bind to)."""
    return tuple(inspect.signature(cls.forward).parameters)[2:]


def _llava_model_forward(self, input_ids: Tensor | None = None, *args, **kwargs):
    """The multimodal wrapper's forward (``model.model``): finds the vision tokens of a call that carries vision
    features (images, videos) and hands them to the language model; names the fix when their count is wrong."""
    state: _PatchState = self.language_model._dpvr_state
    if args:  # by name from here on: the classes put their pixel inputs at different positions
        kwargs = {**dict(zip(_forward_params(type(self)), args, strict=False)), **kwargs}
        args = ()
    carried = classes.carried_inputs(state.model_class, kwargs)
    if not carried:
        # No vision features: stock embeds placeholder ids as text, and so does DPVR-LF (decode steps).
        return type(self).forward(self, input_ids, *args, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and (cache.dpvr_filled if is_dpvr_cache(cache) else int(cache.get_seq_length()) > 0):
        raise ValueError(
            f"{carried[0].kind}s in a decode step: {carried[0].pixels} were passed with a cache that already holds "
            "tokens. DPVR-LF routes vision tokens only in the prefill (the deep layers cache text only): put every "
            f"{carried[0].kind} in the prompt, drop {carried[0].pixels} when continuing from a cache, or run this "
            "input as a new prefill without a cache."
        )
    mask = classes.vision_mask(self, carried, input_ids, kwargs.get("inputs_embeds"))
    try:
        return type(self).forward(self, input_ids, *args, **kwargs, **{VISION_MASK_KW: mask})
    except ValueError as err:
        # The stock count check runs on device (no extra host sync here); name the fix when it fires.
        kind = next((v for v in carried if f"{v.kind} features and {v.kind} tokens do not match" in str(err).lower()),
                    None)
        if kind is None:
            raise
        token = getattr(self.config, kind.token_id)
        if kind.kind == "image" and type(self).__name__ in ("LlavaModel", "VipLlavaModel"):
            need = f"exactly {tokens_per_image(self.config)} image tokens per image in pixel_values"
        else:
            need = f"as many {kind.kind} tokens per {kind.kind} as its features (they depend on its size/frames)"
        raise ValueError(
            f"{err}. The prompt must hold {need} (config.{kind.token_id}={token}); the model's processor "
            "inserts them: build inputs with processor(text=..., images=..., videos=...)"
        ) from err


def _generate(self, *args, **kwargs):
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
        kwargs.pop("cache_implementation", None)
        if getattr(gen_cfg, "cache_implementation", None) is not None:  # generate refuses a cache and an impl
            gen_cfg = copy.deepcopy(gen_cfg)
            gen_cfg.cache_implementation = None
            kwargs["generation_config"] = gen_cfg
        kwargs[_CACHE_KW] = _static_cache_for(self, gen_cfg, args, kwargs)
    return type(self).generate(self, *args, **kwargs)


def _masks_for_generate(self, attention_mask=None, cache=None, **kwargs):
    """generate() turns the 2-D mask into 4-D masks up front for a static cache; DPVR-LF routes by the 2-D mask
    and builds each layer's mask itself, so it keeps the 2-D one. In decode steps over a static cache the mask is
    zero-padded to the cache's capacity, as stock's 4-D masks are: every step then has the same shapes, so a
    compiled step (and its CUDA graph) is reused instead of re-made for each new length."""
    cache = cache if cache is not None else kwargs.get("past_key_values")
    if attention_mask is None or not isinstance(cache, DPVRStaticCache) or not cache.dpvr_filled:
        return attention_mask
    capacity = cache.layers[cache.dpvr_full_layer].max_cache_len
    return torch.nn.functional.pad(attention_mask, (0, capacity - attention_mask.shape[1]))


def text_static_cache(model: nn.Module, prompt: Tensor, attention_mask: Tensor | None, fed: int,
                      vision_inputs: dict) -> DPVRStaticCache:
    """A static cache for ``prompt`` (``input_ids`` or ``inputs_embeds``) and ``fed`` tokens fed after it: every
    token for the layers that hold every token, the longest text stream + ``fed`` for the deep layers (one host
    sync). Vision tokens are those of the inputs ``vision_inputs`` carries (e.g. ``pixel_values``)."""
    state: _PatchState = model.model.language_model._dpvr_state
    batch, length = prompt.shape[:2]
    text = (torch.ones(batch, length, dtype=torch.bool, device=prompt.device) if attention_mask is None
            else attention_mask.bool())
    carried = classes.carried_inputs(state.model_class, vision_inputs)
    if carried and not prompt.is_floating_point():  # ids (embeddings carry no ids: every slot counts as text)
        text = text & ~classes.vision_mask(model.model, carried, prompt, None)
    longest_text = int(text.sum(1).max())
    return DPVRStaticCache(config=model.config, max_cache_len=length + fed, text_cache_len=longest_text + fed,
                           route_layer=state.settings.route_layer, fusion_layers=state.settings.fusion_layers)


def _static_cache_for(model: nn.Module, gen_cfg, args: tuple, kwargs: dict) -> DPVRStaticCache:
    """The static cache of one generate call, sized as stock sizes it: prompt + new tokens - 1 (the last new
    token is never fed back), the deep layers for text only."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if prompt is None:
        raise ValueError("generate(cache_implementation='static') under DPVR-LF needs input_ids or inputs_embeds")
    max_new = kwargs.get("max_new_tokens", getattr(gen_cfg, "max_new_tokens", None))
    if max_new is None:
        max_new = kwargs.get("max_length", gen_cfg.max_length) - prompt.shape[1]
    return text_static_cache(model, prompt, kwargs.get("attention_mask"), max_new - 1, kwargs)


# ---------------------------------------------------------------------------------------- patch/unpatch


def _language_model(model: nn.Module) -> nn.Module:
    classes.model_class(model)
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(
            f"{type(model).__name__} has no decoder at model.model.language_model.layers (a modified class?); "
            "DPVR-LF patches the stock layout of the Hugging Face LLaVA classes"
        )
    return lm


def _layer_types(lm: nn.Module) -> tuple[tuple[str, ...], int | None]:
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


def _check_backbone(lm: nn.Module) -> None:
    if not hasattr(lm, "rotary_emb"):
        raise ValueError(
            f"{type(lm).__name__} has no rotary position embeddings (rotary_emb): DPVR-LF keeps each token's "
            "original position through RoPE; use a Llama-family backbone (Llama/Vicuna, Mistral, Qwen2)"
        )


def saved_tensors(path: str):
    """``(key, open safetensors file)`` for every tensor that save_pretrained wrote into the folder ``path``."""
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    yield key, f


def _load_saved_side_branch(model: nn.Module, side: nn.Module) -> bool:
    """After from_pretrained, read the side-branch weights that save_pretrained wrote (transformers drops
    them as unexpected keys, since the stock class has no side branch)."""
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not os.path.isdir(path):
        return False
    state = {}
    for key, f in saved_tensors(path):
        # transformers may rewrite the prefix on save (e.g. language_model.model.*): match the module
        _, sep, rest = key.partition(f"{SIDE_BRANCH}.")
        if sep:
            state[rest] = f.get_tensor(key)
    if not state:
        return False
    distributed.load_side_branch_state(side, state)
    return True


def patch(model: nn.Module, route_layer: int | None = None, fusion_layers: int = 1, backend: str = "auto") -> nn.Module:
    """Turn a Hugging Face LLaVA model into its DPVR-LF form, in place.

    Args:
        model: a model of a class in ``dpvr_kernels.models.classes.SUPPORTED`` (LLaVA, LLaVA-NeXT, NeXT-Video,
            OneVision, VipLLaVA) with a Llama-family backbone (RoPE; GQA and sliding windows allowed).
        route_layer: layer at which image tokens leave for the side branch; ``None`` is
            ``round(N * 18 / 32)`` (18 for LLaVA-1.5-7B), or the value saved in ``config.dpvr``.
        fusion_layers: number of last layers that run on the fused full sequence (>= 1).
        backend: route/merge kernels: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        ``model`` itself. The side branch is ``model.model.language_model.dpvr_side_branch``; the
        settings are in ``model.config.dpvr``. :func:`unpatch` restores the stock model.
    """
    lm = _language_model(model)
    _check_backbone(lm)
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
    layer_types, window = _layer_types(lm)
    state = _PatchState(settings=settings, model_class=classes.model_class(model), layer_types=layer_types,
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
    elif saved and not _load_saved_side_branch(model, side):
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


def _bind(model: nn.Module, lm: nn.Module, state: _PatchState) -> None:
    """Install the DPVR-LF forward on the instance: the methods, and the varlen attention of the deep layers."""
    for i in state.original_attn_configs:
        lm.layers[i].self_attn.config = state.varlen_config
    lm.forward = types.MethodType(dpvr_language_forward, lm)
    model.model.forward = types.MethodType(_llava_model_forward, model.model)
    model.generate = types.MethodType(_generate, model)
    model.create_masks_for_generate = types.MethodType(_masks_for_generate, model)


def _unbind(model: nn.Module, lm: nn.Module, state: _PatchState) -> None:
    """Undo :func:`_bind`: the class's own (stock) methods and attention configs again."""
    for i, cfg in state.original_attn_configs.items():
        lm.layers[i].self_attn.config = cfg
    for obj in (lm, model.model):
        obj.__dict__.pop("forward", None)
    for name in ("generate", "create_masks_for_generate"):
        model.__dict__.pop(name, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock forward of a patched model, bit-exact; removes the side branch and ``config.dpvr``."""
    lm = _language_model(model)
    state: _PatchState | None = getattr(lm, "_dpvr_state", None)
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
    return getattr(getattr(getattr(model, "model", None), "language_model", None), "_dpvr_state", None) is not None


_STOCK_COPY = "dpvr_stock__"


def keep_stock_weights(model: nn.Module, modules: list[nn.Module]) -> int:
    """Keep frozen copies of ``modules``' parameters, which :func:`stock_forward` computes with.

    Call it before training stock weights (the fusion layers): the teacher of a distillation is the stock
    forward, and it must stay the *original* model while the student's fusion layers move. The copies are
    non-persistent buffers on the modules (they follow ``.to()`` and are left out of ``state_dict`` and saved
    folders); :func:`unpatch` drops them. Idempotent per module. Returns the number of elements kept.
    """
    lm = _language_model(model)
    state: _PatchState | None = getattr(lm, "_dpvr_state", None)
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


@contextlib.contextmanager
def _stock_weights(state: _PatchState) -> Iterator[None]:
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
    lm = _language_model(model)
    state: _PatchState = lm._dpvr_state
    _unbind(model, lm, state)
    try:
        with _stock_weights(state):
            yield model
    finally:
        _bind(model, lm, state)


@contextlib.contextmanager
def stock_attention(model: nn.Module):
    """Within the block, the deep layers use the user's attention implementation again (for the reference)."""
    lm = _language_model(model)
    state: _PatchState | None = getattr(lm, "_dpvr_state", None)
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


def describe(model: nn.Module) -> str:
    """A short report: route layer, streams' kernels and attention paths, fallbacks taken."""
    from ..ops import _extension
    from ..ops.backends import resolve_backend

    if not is_patched(model):
        return f"{type(model).__name__}: not patched (stock forward)"
    lm = _language_model(model)
    state: _PatchState = lm._dpvr_state
    p = next(lm.parameters())
    n = len(lm.layers)
    r, f = state.settings.route_layer, state.settings.fusion_layers
    kernel = resolve_backend(state.settings.backend, p.device)
    kernel_name = {"ext": f"compiled extension ({p.device.type})", "triton": "Triton", "torch": "torch indexing"}[kernel]
    lines = [
        f"DPVR-LF on {type(model).__name__} ({type(lm).__name__}, {n} layers, {p.dtype}, {p.device})",
        f"  layers [0, {r}): full sequence, attention '{state.user_attn}'",
        f"  side branch: copy of layer {r} on image tokens, attention '{ATTN_NAME}' via "
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
