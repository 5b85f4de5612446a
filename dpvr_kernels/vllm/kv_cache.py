"""The deep layers' own KV cache in vLLM: blocks for a request's *text* tokens only.

Layers ``[r, N-f)`` never see vision tokens, so their cache needs one slot per text token. Giving those layers a KV
cache spec of their own (:class:`TextOnlyAttentionSpec`) puts them in their own KV cache group, with its own block
table; its manager (:class:`TextOnlyAttentionManager`) sizes each request's blocks for ``tokens - vision tokens``.
vLLM then admits requests against that smaller footprint: more of them fit in the same KV memory.

vLLM's scheduler knows a request's vision tokens (its multimodal placeholders); the managers only get request ids,
so the wrapped ``KVCacheManager`` methods note each request as it is looked up and allocated. A prompt prefilled in
chunks needs the text tokens among its first ``n`` tokens, for every ``n``: counted from where the placeholders sit.
The side branch's vision-only group (:class:`VisionOnlyAttentionSpec`) works the same way for vision tokens.

Prefix caching works on these compacted blocks too (:class:`_StreamManager`): their keys chain over the whole
prefix, and a hit that ends inside one of their blocks takes it through vLLM's copy-on-write.

Importing this module registers the specs and their managers (it is imported in every vLLM process: by the model,
and wherever a spec is unpickled).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

from . import check_vllm_version

check_vllm_version()

from vllm.config import VllmConfig  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager  # noqa: E402
from vllm.v1.kv_cache_interface import AttentionSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402

__all__ = ["TextOnlyAttentionManager", "TextOnlyAttentionSpec", "VisionOnlyAttentionManager", "VisionOnlyAttentionSpec",
           "VisionLayout", "text_only_spec", "vision_only_spec"]


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


_LOOKUP: list = [None]
"""Scheduler process: the request whose prefix-cache hit is being looked up (the finder gets its hashes only)."""


def _vision_before(span, num_tokens: int) -> int:
    """Vision tokens (embedded positions) of one placeholder among a request's first ``num_tokens`` tokens."""
    covered = min(max(num_tokens - span.offset, 0), span.length)
    is_embed = getattr(span, "is_embed", None)
    return covered if is_embed is None else int(is_embed[:covered].sum())


class VisionLayout:
    """Where a request's vision tokens sit (its multimodal features' ``mm_position`` placeholders), for counting
    them before any token index; past the last placeholder (every decode step) the count is the total, without a
    loop. The scheduler sizes blocks with it, the model places a request's tokens in the compacted streams with it."""

    __slots__ = ("end", "spans", "total")

    def __init__(self, mm_features) -> None:
        self.spans = [f.mm_position for f in mm_features or ()]
        self.end = max((span.offset + span.length for span in self.spans), default=0)
        self.total = sum(_vision_before(span, self.end) for span in self.spans)

    def before(self, num_tokens: int) -> int:
        if num_tokens >= self.end:
            return self.total
        return sum(_vision_before(span, num_tokens) for span in self.spans)


_LAYOUTS: dict[str, VisionLayout] = {}
"""Scheduler process: the vision layout of each request with text-only or vision-only blocks, by request id, from
its first cache lookup or allocation until it is freed."""


def _vision_tokens(request_id: str, num_tokens: int) -> int:
    """Vision tokens among a request's first ``num_tokens`` tokens."""
    layout = _LAYOUTS.get(request_id)
    return layout.before(num_tokens) if layout is not None else 0


def _text_tokens(request_id: str, num_tokens: int) -> int:
    """Text tokens among a request's first ``num_tokens`` tokens (all of them while its prompt is prefilled in
    chunks, then the decoded ones)."""
    return max(num_tokens - _vision_tokens(request_id, num_tokens), 0)


_COMPLETE = 1 << 30
"""Set in the group id of a compacted block's *complete* key (every slot final), beside its *partial* keys: both
kinds are keyed by the same prefix hashes, so they need key spaces of their own."""


class _StreamManager(FullAttentionManager):
    """Full-attention block management for one stream's tokens (``_count``: that stream's tokens among a request's
    first ``n``), its blocks compacted: the stream's token ``k`` sits at slot ``k`` of the request's blocks.

    Prefix caching. Block ``j`` holds stream tokens ``[j*B, (j+1)*B)``; their KV depends on every earlier token of the
    request (images included, through layers ``[0, r)``), so its keys are vLLM's prefix hashes (each chains over the
    whole prefix) at hash boundaries ``L``:

    - its *complete* key at the first boundary where the block is full, valid for any prefix that extends it;
    - a *partial* key at each boundary ``L`` where it holds the stream's last tokens before ``L`` (``S(L) % B``
      of them, ``S`` the stream count). A hit that ends there takes the block through vLLM's copy-on-write, as vLLM
      does for its own partial hits: the request writes its next tokens into a private copy.

    A hit at ``L`` needs the complete blocks ``0 .. S(L)//B - 1`` and, unless ``S(L) % B == 0``, the partial block;
    the finder returns the longest such ``L`` up to the full layers' hit. Counts handed to the base class (tokens,
    computed tokens) are translated into the stream's tokens, so its allocation and copy-on-write logic apply as
    they are. Keys are registered one scheduling step late: a hit scheduled in the step that computes a block
    would copy it before it is written.
    """

    _count = staticmethod(lambda request_id, num_tokens: num_tokens)
    supports_fine_grained_hash_lookup = False  # hits land on scheduler-block boundaries

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._registered: dict[str, int] = {}  # per request: prefix tokens whose keys are registered
        self._scheduled: dict[str, int] = {}  # per request: tokens passed to the last cache_blocks (computed by now)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, *args, **kwargs) -> int:
        count = functools.partial(self._count, request_id)
        return super().get_num_blocks_to_allocate(
            request_id, count(num_tokens), new_computed_blocks, count(total_computed_tokens),
            count(num_local_computed_tokens), count(num_tokens_main_model), *args, **kwargs)

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks, num_local_computed_tokens: int,
                                  num_external_computed_tokens: int) -> None:
        self._registered[request_id] = num_local_computed_tokens  # a hit's keys exist already
        super().add_local_computed_blocks(request_id, new_computed_blocks,
                                          self._count(request_id, num_local_computed_tokens),
                                          self._count(request_id, num_external_computed_tokens))

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(request_id, self._count(request_id, num_tokens),
                                           self._count(request_id, num_tokens_main_model))

    def cache_blocks(self, request, num_tokens: int, retention_interval: int | None = None, **kwargs) -> None:
        if not self.enable_caching:
            return
        rid = request.request_id
        computed = self._scheduled.get(rid, 0)
        self._scheduled[rid] = num_tokens
        self.register_keys(request, computed)
        self.num_cached_block.setdefault(rid, 0)  # marks a running request (the base class's fast path)

    def register_keys(self, request, num_computed_tokens: int) -> None:
        """Register the keys of the request's blocks for the hash boundaries up to ``num_computed_tokens`` (tokens
        whose KV is written)."""
        rid, h, bs = request.request_id, self.block_pool.hash_block_size, self.block_size
        start = self._registered.get(rid, 0)
        end = min(num_computed_tokens, len(request.block_hashes) * h)
        boundary = (start // h + 1) * h
        if boundary > end:  # no new hash boundary (most decode steps)
            return
        blocks = self.req_to_blocks.get(rid, [])
        before = self._count(rid, boundary - h)
        while boundary <= end:
            now = self._count(rid, boundary)
            block_hash = request.block_hashes[boundary // h - 1]
            # The block that became full within this hash block: at most one, as a hash block (h tokens) never holds
            # more than h <= B stream tokens; so one complete key per boundary.
            for j in range(before // bs, now // bs):
                self._insert(block_hash, self.kv_cache_group_id | _COMPLETE, blocks[j], boundary)
            if now % bs:
                self._insert(block_hash, self.kv_cache_group_id, blocks[now // bs], boundary)
            before, boundary = now, boundary + h
        self._registered[rid] = max(start, end // h * h)

    def _insert(self, block_hash, group_id: int, block, num_tokens: int) -> None:
        self.block_pool._insert_block_hash(make_block_hash_with_group_id(block_hash, group_id), block, num_tokens)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length: int, kv_cache_group_ids: list[int], block_pool,
                               kv_cache_spec, drop_eagle_block: bool, alignment_tokens: int, dcp_world_size: int = 1,
                               pcp_world_size: int = 1):
        request = _LOOKUP[0]
        if request is None or request.block_hashes is not block_hashes:
            raise RuntimeError("dpvr_kernels: a prefix-cache lookup for a request the plugin did not see start; "
                               "please report this with the engine arguments")
        count = functools.partial(cls._count, request.request_id)
        h, bs = block_pool.hash_block_size, kv_cache_spec.block_size
        groups = len(kv_cache_group_ids)
        complete: list[list] = [[] for _ in range(groups)]  # the leading run of complete blocks that are cached
        boundary, before = h, 0
        while boundary <= min(max_length, len(block_hashes) * h):
            now = count(boundary)
            for _ in range(before // bs, now // bs):
                found = block_pool.get_cached_block(block_hashes[boundary // h - 1],
                                                    [g | _COMPLETE for g in kv_cache_group_ids])
                if found is None:
                    break
                for blocks, block in zip(complete, found, strict=True):
                    blocks.append(block)
            else:
                before, boundary = now, boundary + h
                continue
            break
        for hit in range(max_length // alignment_tokens * alignment_tokens, 0, -alignment_tokens):
            stream = count(hit)
            if stream // bs > len(complete[0]):
                continue
            hit_blocks = [blocks[: stream // bs] for blocks in complete]
            if stream % bs:
                tail = block_pool.get_cached_block(block_hashes[hit // h - 1], kv_cache_group_ids)
                if tail is None:
                    continue
                for blocks, block in zip(hit_blocks, tail, strict=True):
                    blocks.append(block)
            return tuple(hit_blocks), hit
        return tuple([] for _ in range(groups)), 0

    def pop_blocks_for_free(self, request_id: str):
        self._registered.pop(request_id, None)
        self._scheduled.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


class TextOnlyAttentionManager(_StreamManager):
    """Blocks for a request's text tokens so far (the deep layers)."""

    _count = staticmethod(_text_tokens)


class VisionOnlyAttentionManager(_StreamManager):
    """Blocks for a request's vision tokens so far (the side branch, when chunked prefill or prefix caching lets a
    request's vision tokens span steps)."""

    _count = staticmethod(_vision_tokens)


def _stream_managers(kv_cache_manager: KVCacheManager) -> list[_StreamManager]:
    found = kv_cache_manager.__dict__.get("_dpvr_stream_managers")
    if found is None:  # the managers are fixed once the engine has its KV cache groups
        managers = getattr(kv_cache_manager.coordinator, "single_type_managers", ())
        found = kv_cache_manager._dpvr_stream_managers = [m for m in managers if isinstance(m, _StreamManager)]
    return found


def _record_request(method):
    """Wraps a ``KVCacheManager`` method that gets a request before its blocks are looked up or sized: note the
    request (its placeholders) for the stream managers."""

    @functools.wraps(method)
    def wrapper(self: KVCacheManager, request, *args, **kwargs):
        if _stream_managers(self):
            if request.request_id not in _LAYOUTS:
                _LAYOUTS[request.request_id] = VisionLayout(request.mm_features)
            _LOOKUP[0] = request
        try:
            return method(self, request, *args, **kwargs)
        finally:
            _LOOKUP[0] = None

    wrapper._dpvr_wrapped = True
    return wrapper


def _forget_on_free(free, register: bool):
    """Wraps ``KVCacheManager.free`` (``register``: a finished or preempted request's last computed tokens get their
    keys before its blocks go back to the pool, where they stay cached until reused) or ``pop_blocks_for_free`` (a
    free deferred while a step may still write the blocks: no keys, their KV may not be written yet). Either way
    the request is forgotten."""

    @functools.wraps(free)
    def wrapper(self: KVCacheManager, request, *args, **kwargs):
        if register and request.request_id in _LAYOUTS:
            for manager in _stream_managers(self):
                if manager.enable_caching and request.request_id in manager.req_to_blocks:
                    manager.register_keys(request, request.num_computed_tokens)
        try:
            return free(self, request, *args, **kwargs)
        finally:
            _LAYOUTS.pop(request.request_id, None)

    wrapper._dpvr_wrapped = True
    return wrapper


def _register() -> None:
    KVCacheSpecRegistry._ensure_registered()  # the built-in specs first: registering ours would otherwise skip them
    KVCacheSpecRegistry.register(TextOnlyAttentionSpec, TextOnlyAttentionManager)
    KVCacheSpecRegistry.register(VisionOnlyAttentionSpec, VisionOnlyAttentionManager)
    for name, wrap in (("get_computed_blocks", _record_request), ("allocate_slots", _record_request),
                       ("free", functools.partial(_forget_on_free, register=True)),
                       ("pop_blocks_for_free", functools.partial(_forget_on_free, register=False))):
        method = getattr(KVCacheManager, name)
        if not getattr(method, "_dpvr_wrapped", False):
            setattr(KVCacheManager, name, wrap(method))


_register()
