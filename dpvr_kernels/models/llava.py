"""DPVR-LF for Hugging Face ``LlavaForConditionalGeneration``: patch, the routed forward, unpatch.

The patch binds methods onto one model instance (nothing global changes but the registration of the
``"dpvr_varlen"`` attention function), and :func:`unpatch` removes them again, bit-exact.

Data flow of a prefill (DESIGN §4)::

    embeds ─ layers[0, r) ─ route_split ─ text  ─ layers[r, N-f) (varlen) ─┐
                                     └─ image ─ side branch (varlen)    ─ fuse_merge ─ layers[N-f, N) ─ norm

Decode steps carry text tokens only: layers [r, N-f) attend over their text-only cache with a mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..config import DPVRConfig
from ..flops import tokens_per_image
from ..ops import fuse_merge, route_split
from ..plan import RoutePlan, build_route_plan_from_mask
from . import attention
from .attention import ATTN_NAME, VarlenSegments

SIDE_BRANCH = "dpvr_side_branch"

# The image mask of the current LLaVA call, handed from the LlavaModel wrapper (which sees input_ids)
# to the language model forward (which only sees embeddings).
_IMAGE_MASK: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("dpvr_image_mask", default=None)

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; follow whichever is installed.
_CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_TAKES_LAYER_IDX = "layer_idx" in inspect.signature(create_causal_mask).parameters


@dataclass
class _PatchState:
    """What patch() changed on the instance, so that unpatch() can put it back."""

    settings: DPVRConfig
    image_token_id: int
    user_attn: str
    varlen_config: object
    original_attn_configs: dict[int, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- cache


class _TextCacheWriter:
    """Cache view for the deep layers in a prefill: stores the packed text K/V per sample.

    The real cache layer gets ``[B, Hkv, W, Dh]`` with each sample's text tokens right-aligned
    (left-padded) in ``W = max text tokens`` slots, so decode steps can append to every sample at once.
    The attention of the prefill itself still sees the packed stream.
    """

    def __init__(self, cache, slots: Tensor, batch_size: int, width: int):
        self.cache, self.slots, self.batch_size, self.width = cache, slots, batch_size, width

    def _pad(self, packed: Tensor) -> Tensor:
        out = packed.new_zeros(packed.shape[1], self.batch_size * self.width, packed.shape[-1])
        out.index_copy_(1, self.slots, packed[0])
        return out.view(packed.shape[1], self.batch_size, self.width, packed.shape[-1]).transpose(0, 1)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        self.cache.update(self._pad(key_states), self._pad(value_states), layer_idx, *args, **kwargs)
        return key_states, value_states

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _text_cache_layout(plan: RoutePlan) -> tuple[Tensor, Tensor]:
    """Slots of the packed text tokens in the ``[B, W]`` right-aligned cache layout, and its validity mask."""
    width = plan.max_text_len
    starts = plan.text_cu_seqlens.long()
    counts = starts[1:] - starts[:-1]
    sample = plan.text_index // plan.seq_len
    rank = torch.arange(plan.num_text, device=plan.device) - starts[sample]
    slots = sample * width + (width - counts[sample]) + rank
    valid = torch.arange(width, device=plan.device)[None, :] >= (width - counts)[:, None]
    return slots, valid


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a live transformers cache (all layers)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------- forward


def _layer_call(layer: nn.Module, hidden: Tensor, cache, **kw) -> Tensor:
    out = layer(hidden, **{_CACHE_KW: cache}, **kw)
    return out[0] if isinstance(out, tuple) else out


def _full_mask(lm, inputs_embeds: Tensor, attention_mask: Tensor | None, cache, position_ids: Tensor):
    kw = {"config": lm.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
          _CACHE_KW: cache, "position_ids": position_ids}
    if _MASK_TAKES_LAYER_IDX:
        kw["layer_idx"] = len(lm.layers) - 1  # a fusion layer: its cache holds every token
    return create_causal_mask(**kw)


def _route_forward(lm, hidden: Tensor, image_mask: Tensor, attention_mask, position_ids: Tensor, cache,
                   use_cache: bool, layer_kwargs: dict) -> Tensor:
    """Prefill of layers [r, N-f): route, run the text stream and the side branch, fuse."""
    state: _PatchState = lm._dpvr_state
    r, f = state.settings.route_layer, state.settings.fusion_layers
    backend = state.settings.backend
    plan = build_route_plan_from_mask(image_mask, attention_mask, position_ids)
    text, image = route_split(hidden, plan, backend=backend)

    text_pos = plan.text_position_ids[None]
    text_cache = None
    if cache is not None:
        slots, valid = _text_cache_layout(plan)
        text_cache = _TextCacheWriter(cache, slots, plan.batch_size, plan.max_text_len)
        cache._dpvr_text_valid = valid  # decode steps mask the empty slots with it
        cache._dpvr_prefill_len = plan.seq_len
    segments = VarlenSegments(plan.text_cu_seqlens, plan.text_seqlens, plan.max_text_len)
    text = text[None]
    pe = lm.rotary_emb(text, text_pos)
    for layer in lm.layers[r : len(lm.layers) - f]:
        text = _layer_call(layer, text, text_cache, attention_mask=None, position_embeddings=pe,
                           position_ids=text_pos, use_cache=use_cache, dpvr_segments=segments, **layer_kwargs)

    if plan.num_image:
        image_pos = plan.image_position_ids[None]
        segments = VarlenSegments(plan.image_cu_seqlens, plan.image_seqlens, plan.max_image_len)
        image = image[None]
        pe = lm.rotary_emb(image, image_pos)
        image = _layer_call(getattr(lm, SIDE_BRANCH), image, None, attention_mask=None, position_embeddings=pe,
                            position_ids=image_pos, use_cache=False, dpvr_segments=segments, **layer_kwargs)[0]
    return fuse_merge(text[0], image, hidden, plan, backend=backend)


def _deep_decode_mask(cache, attention_mask: Tensor | None, past: int, q_len: int, batch: int,
                      device: torch.device) -> Tensor:
    """Boolean ``[B, 1, q, K]`` mask of a decode step over a deep layer's text-only cache."""
    text_valid = getattr(cache, "_dpvr_text_valid", None)
    if text_valid is None:
        raise RuntimeError(
            "this cache was not filled by a DPVR-LF prefill: run the prompt through the patched model first "
            "(model.generate does), or unpatch the model to reuse a stock cache"
        )
    decoded = past - cache._dpvr_prefill_len  # tokens decoded before this step
    if attention_mask is not None and attention_mask.dim() == 2:
        new_valid = attention_mask[:, cache._dpvr_prefill_len : past + q_len].bool()
    else:
        new_valid = torch.ones(batch, decoded + q_len, dtype=torch.bool, device=device)
    key_valid = torch.cat([text_valid, new_valid], dim=1)  # [B, W + decoded + q]
    width = text_valid.shape[1]
    key = torch.arange(key_valid.shape[1], device=device)[None, :]
    query = torch.arange(q_len, device=device)[:, None]
    causal = key <= width + decoded + query  # the prompt's text is visible to every new token
    return (key_valid[:, None, None, :] & causal[None, None]).expand(batch, 1, q_len, key_valid.shape[1])


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
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"DPVR-LF needs a 2-D attention_mask [B, L] (1 = token, 0 = pad) to route tokens; got "
            f"{attention_mask.dim()}-D. Pass the tokenizer's mask instead of a prepared 4-D mask."
        )
    image_mask = _IMAGE_MASK.get()
    if image_mask is None and input_ids is not None:
        image_mask = input_ids == state.image_token_id
    if image_mask is None:
        image_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)

    if use_cache is None:
        use_cache = self.config.use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=self.config)
    num_layers = len(self.layers)
    r, f = state.settings.route_layer, state.settings.fusion_layers
    batch, q_len = inputs_embeds.shape[:2]
    past = cache.get_seq_length(num_layers - 1) if cache is not None else 0
    if position_ids is None:
        position_ids = (torch.arange(q_len, device=inputs_embeds.device) + past).unsqueeze(0)

    full_mask = _full_mask(self, inputs_embeds, attention_mask, cache, position_ids)
    pe = self.rotary_emb(inputs_embeds, position_ids)
    common = dict(position_embeddings=pe, position_ids=position_ids, use_cache=use_cache, **kwargs)
    hidden = inputs_embeds
    for layer in self.layers[:r]:
        hidden = _layer_call(layer, hidden, cache, attention_mask=full_mask, **common)

    if past == 0:
        hidden = _route_forward(self, hidden, image_mask, attention_mask, position_ids, cache, use_cache, kwargs)
    else:
        if image_mask.any():
            raise ValueError(
                "image tokens in a decode step: DPVR-LF routes images only in the prefill (the deep layers cache "
                "text only). Put every image in the prompt, or run this input as a new prefill without a cache."
            )
        deep_mask = _deep_decode_mask(cache, attention_mask, past, q_len, batch, inputs_embeds.device)
        for layer in self.layers[r : num_layers - f]:
            hidden = _layer_call(layer, hidden, cache, attention_mask=deep_mask, **common)

    for layer in self.layers[num_layers - f :]:
        hidden = _layer_call(layer, hidden, cache, attention_mask=full_mask, **common)
    hidden = self.norm(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_KW: cache})


def _llava_model_forward(self, input_ids: Tensor | None = None, *args, **kwargs):
    """LlavaModel.forward wrapper: finds the image tokens (it sees input_ids) and checks their count."""
    state: _PatchState = self.language_model._dpvr_state
    if input_ids is not None:
        image_mask = input_ids == state.image_token_id
    elif kwargs.get("inputs_embeds") is not None:
        token = torch.full((), state.image_token_id, dtype=torch.long, device=kwargs["inputs_embeds"].device)
        image_mask = (kwargs["inputs_embeds"] == self.get_input_embeddings()(token)).all(-1)
    else:
        image_mask = None
    token = _IMAGE_MASK.set(image_mask)
    try:
        return type(self).forward(self, input_ids, *args, **kwargs)
    except ValueError as err:
        # The stock count check runs on device (no extra host sync here); name the fix when it fires.
        if "image tokens do not match" not in str(err):
            raise
        per_image = tokens_per_image(self.config)
        raise ValueError(
            f"{err}. The prompt must hold exactly {per_image} image tokens (config.image_token_id="
            f"{self.config.image_token_id}) per image in pixel_values; the LLaVA processor inserts them"
        ) from err
    finally:
        _IMAGE_MASK.reset(token)


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
    if impl not in (None, "dynamic"):
        raise NotImplementedError(
            f"cache_implementation={impl!r} is not supported under DPVR-LF: the deep layers hold a text-only "
            "cache of another length; use the default dynamic cache"
        )
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and type(cache) is not DynamicCache:
        raise NotImplementedError(f"{type(cache).__name__} is not supported under DPVR-LF; pass a DynamicCache or none")
    return type(self).generate(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------- patch/unpatch


def _language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(model.config, "image_token_id"):
        raise TypeError(
            f"dpvr_kernels.patch expects a Hugging Face LlavaForConditionalGeneration (model.model.language_model "
            f"with decoder layers and config.image_token_id); got {type(model).__name__}"
        )
    return lm


def _check_backbone(lm: nn.Module) -> None:
    if not hasattr(lm, "rotary_emb"):
        raise ValueError(
            f"{type(lm).__name__} has no rotary position embeddings (rotary_emb): DPVR-LF keeps each token's "
            "original position through RoPE; use a Llama-family backbone (Llama/Vicuna, Mistral, Qwen2)"
        )
    cfg = lm.config
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types or (
        getattr(cfg, "sliding_window", None) is not None and cfg.model_type == "mistral"
    )
    if sliding:
        raise NotImplementedError(
            "sliding-window attention is not supported under DPVR-LF (windows over a packed text stream are not "
            "defined); set text_config.sliding_window=None (and use_sliding_window=False) or leave this model stock"
        )


def _load_saved_side_branch(model: nn.Module, side: nn.Module) -> bool:
    """After from_pretrained, read the side-branch weights that save_pretrained wrote (transformers drops
    them as unexpected keys, since the stock class has no side branch)."""
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not os.path.isdir(path):
        return False
    from safetensors import safe_open

    state = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                # transformers may rewrite the prefix on save (e.g. language_model.model.*): match the module
                _, sep, rest = key.partition(f"{SIDE_BRANCH}.")
                if sep:
                    state[rest] = f.get_tensor(key)
    if not state:
        return False
    ref = next(side.parameters())
    side.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()}, strict=True)
    return True


def patch(model: nn.Module, route_layer: int | None = None, fusion_layers: int = 1, backend: str = "auto") -> nn.Module:
    """Turn a Hugging Face LLaVA model into its DPVR-LF form, in place.

    Args:
        model: a ``LlavaForConditionalGeneration`` with a Llama-family backbone.
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
    if settings.route_layer == 0 and not _MASK_TAKES_LAYER_IDX:
        raise ValueError("route_layer=0 needs transformers with create_causal_mask(layer_idx=...); use route_layer >= 1")

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
    state = _PatchState(settings=settings, image_token_id=int(model.config.image_token_id),
                        user_attn=lm.config._attn_implementation or "eager", varlen_config=varlen_config)
    r, f, n = settings.route_layer, settings.fusion_layers, len(lm.layers)

    side = copy.deepcopy(lm.layers[r])
    side.self_attn.config = varlen_config
    if saved and not _load_saved_side_branch(model, side):
        warnings.warn(
            "dpvr_kernels: config.dpvr is set but no saved side-branch weights were found; the side branch "
            f"starts as a copy of layer {r}",
            RuntimeWarning,
            stacklevel=2,
        )
    lm.add_module(SIDE_BRANCH, side)
    for i in range(r, n - f):
        attn = lm.layers[i].self_attn
        state.original_attn_configs[i] = attn.config
        attn.config = varlen_config

    lm._dpvr_state = state
    lm.forward = types.MethodType(dpvr_language_forward, lm)
    model.model.forward = types.MethodType(_llava_model_forward, model.model)
    model.generate = types.MethodType(_generate, model)
    model.config.dpvr = settings.to_dict()
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock forward of a patched model, bit-exact; removes the side branch and ``config.dpvr``."""
    lm = _language_model(model)
    state: _PatchState | None = getattr(lm, "_dpvr_state", None)
    if state is None:
        raise ValueError("model is not patched by dpvr_kernels (nothing to unpatch)")
    for i, cfg in state.original_attn_configs.items():
        lm.layers[i].self_attn.config = cfg
    delattr(lm, SIDE_BRANCH)
    for obj in (lm, model.model):
        obj.__dict__.pop("forward", None)
    model.__dict__.pop("generate", None)
    del lm._dpvr_state
    if hasattr(model.config, "dpvr"):
        del model.config.dpvr
    return model


def is_patched(model: nn.Module) -> bool:
    """True when :func:`patch` has been applied to ``model``."""
    return getattr(getattr(getattr(model, "model", None), "language_model", None), "_dpvr_state", None) is not None


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
        f"  side branch: copy of layer {r} on image tokens, varlen attention via {attention.varlen_backend(p.device, p.dtype)}",
        f"  layers [{r}, {n - f}): text tokens only, varlen attention via {attention.varlen_backend(p.device, p.dtype)}",
        f"  layers [{n - f}, {n}): fused full sequence, attention '{state.user_attn}'",
        f"  route_split/fuse_merge: backend={state.settings.backend!r} -> {kernel_name}",
    ]
    if not _extension.available():
        lines.append(f"  fallback: compiled extension unavailable ({_extension.unavailable_reason()})")
    if p.device.type == "cuda" and attention._flash_attn_varlen() is None:
        lines.append("  fallback: flash-attn not installed; torch varlen_attn / SDPA per segment used")
    return "\n".join(lines)
