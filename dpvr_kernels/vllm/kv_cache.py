"""The deep layers' own KV cache in vLLM: blocks for a request's *text* tokens only.

Layers ``[r, N-f)`` never see vision tokens, so their cache needs one slot per text token. Giving those layers a KV
cache spec of their own (:class:`TextOnlyAttentionSpec`) puts them in their own KV cache group, with its own block
table; its manager (:class:`TextOnlyAttentionManager`) sizes each request's blocks for ``tokens - vision tokens``.
vLLM then admits requests against that smaller footprint: more of them fit in the same KV memory.

vLLM's scheduler knows a request's vision tokens (its multimodal placeholders); the manager only gets request ids,
so :func:`_record_vision_tokens` notes each request's placeholders as its slots are allocated. A prompt prefilled
in chunks needs the text tokens among its first ``n`` tokens, for every ``n``: counted from where the placeholders
sit. Importing this module
registers the spec and its manager (it is imported in every vLLM process: by the model, and wherever a spec is
unpickled).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

from . import check_vllm_version

check_vllm_version()

from vllm.config import VllmConfig  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager  # noqa: E402
from vllm.v1.kv_cache_interface import AttentionSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402

__all__ = ["TextOnlyAttentionManager", "TextOnlyAttentionSpec", "VisionOnlyAttentionManager", "VisionOnlyAttentionSpec",
           "text_only_spec", "vision_only_spec"]


@dataclass(frozen=True, kw_only=True)
class TextOnlyAttentionSpec(AttentionSpec):
    """Full causal attention whose cache holds a request's text tokens only (DPVR-LF's deep layers).

    Not a ``FullAttentionSpec`` subclass on purpose: vLLM would then group these layers with the full ones and
    size their blocks for every token.
    """

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # The worst case is an all-text request: as many slots as a full-attention layer.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


@dataclass(frozen=True, kw_only=True)
class VisionOnlyAttentionSpec(AttentionSpec):
    """Full causal attention whose cache holds a request's vision tokens only (the side branch under chunked
    prefill: a later chunk's vision tokens attend to the earlier chunks')."""

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # The worst case is a request of vision tokens only.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


def _twin(spec_cls: type, full: AttentionSpec) -> AttentionSpec:
    return spec_cls(**{f.name: getattr(full, f.name) for f in fields(spec_cls) if f.init})


def text_only_spec(full: AttentionSpec) -> TextOnlyAttentionSpec:
    """The text-only twin of a layer's full-attention spec (same heads, dtype, block size)."""
    return _twin(TextOnlyAttentionSpec, full)


def vision_only_spec(full: AttentionSpec) -> VisionOnlyAttentionSpec:
    """The vision-only twin of a layer's full-attention spec (same heads, dtype, block size)."""
    return _twin(VisionOnlyAttentionSpec, full)


_VISION_SPANS: dict[str, list] = {}
"""Scheduler process: the multimodal placeholders (vLLM ``PlaceholderRange``) of each request with text-only or
vision-only blocks, by request id."""


def _vision_before(span, num_tokens: int) -> int:
    """Vision tokens (embedded positions) of one placeholder among a request's first ``num_tokens`` tokens."""
    covered = min(max(num_tokens - span.offset, 0), span.length)
    is_embed = getattr(span, "is_embed", None)
    return covered if is_embed is None else int(is_embed[:covered].sum())


def _vision_tokens(request_id: str, num_tokens: int) -> int:
    """Vision tokens among a request's first ``num_tokens`` tokens."""
    return sum(_vision_before(span, num_tokens) for span in _VISION_SPANS.get(request_id, ()))


def _text_tokens(request_id: str, num_tokens: int) -> int:
    """Text tokens among a request's first ``num_tokens`` tokens (all of them while its prompt is prefilled in
    chunks, then the decoded ones)."""
    return max(num_tokens - _vision_tokens(request_id, num_tokens), 0)


class _StreamManager(FullAttentionManager):
    """Full-attention block management, sized for one stream's tokens among a request's first ``num_tokens``
    (``_count``; prefix caching is off for DPVR-LF)."""

    _count = staticmethod(lambda request_id, num_tokens: num_tokens)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, self._count(request_id, num_tokens), new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, self._count(request_id, num_tokens_main_model), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(request_id, self._count(request_id, num_tokens),
                                           self._count(request_id, num_tokens_main_model))

    def free(self, request_id: str) -> None:
        super().free(request_id)
        _VISION_SPANS.pop(request_id, None)


class TextOnlyAttentionManager(_StreamManager):
    """Blocks for a request's text tokens so far (the deep layers)."""

    _count = staticmethod(_text_tokens)


class VisionOnlyAttentionManager(_StreamManager):
    """Blocks for a request's vision tokens so far (the side branch under chunked prefill)."""

    _count = staticmethod(_vision_tokens)


def _record_vision_tokens(allocate_slots):
    """Wraps ``KVCacheManager.allocate_slots``: note the request's placeholders before its blocks are sized."""

    @functools.wraps(allocate_slots)
    def wrapper(self: KVCacheManager, request, *args, **kwargs):
        text_only = getattr(self, "_dpvr_text_only", None)
        if text_only is None:
            managers = getattr(self.coordinator, "single_type_managers", ())
            text_only = self._dpvr_text_only = any(isinstance(m, _StreamManager) for m in managers)
        if text_only:
            _VISION_SPANS[request.request_id] = [f.mm_position for f in request.mm_features or ()]
        return allocate_slots(self, request, *args, **kwargs)

    wrapper._dpvr_wrapped = True
    return wrapper


def _register() -> None:
    KVCacheSpecRegistry._ensure_registered()  # the built-in specs first: registering ours would otherwise skip them
    KVCacheSpecRegistry.register(TextOnlyAttentionSpec, TextOnlyAttentionManager)
    KVCacheSpecRegistry.register(VisionOnlyAttentionSpec, VisionOnlyAttentionManager)
    if not getattr(KVCacheManager.allocate_slots, "_dpvr_wrapped", False):
        KVCacheManager.allocate_slots = _record_vision_tokens(KVCacheManager.allocate_slots)


_register()
