"""DPVR-LF LLaVA as a vLLM model: the side branch and the text-only deep layers inside vLLM's batches.

Per engine step vLLM hands the model the flattened tokens of many requests. The forward reads top to bottom:

1. layers ``[0, r)`` run on every token (vLLM's own attention and paged KV);
2. **route**: one :class:`~dpvr_kernels.plan.RoutePlan` over the step (one sequence per request) splits the
   states into the text stream and the vision stream (``route_split``);
3. **side branch**: the vision tokens of each request through one decoder layer, causal within the request's
   vision tokens, original positions; its KV in a vision-only group of its own, at compacted slots, when a
   request's vision tokens may span steps (chunked prefill, prefix caching: vLLM's defaults), else uncached
   (:class:`SideBranchAttention`);
4. **text stream**: layers ``[r, N-f)`` on the text tokens only. Their attention metadata is built for the
   text subset by the backend's own metadata builder (the way vLLM's Gemma3n fast prefill gives some layers a
   subset of the tokens): per request, queries are its text tokens, keys its earlier text tokens, and the KV
   cache holds text tokens at compacted slots of the request's blocks in the deep layers' own KV cache group
   (``kv_cache.py``: blocks sized for text tokens only, prefix-cached under keys that chain over the whole
   prompt);
5. **fuse**: both streams back to their positions (``fuse_merge``), then layers ``[N-f, N)`` on every token.

A step with no vision token (every decode step) skips 2-5's routing: the deep layers' builder, which vLLM's runner
calls before the forward (:class:`_Step`, ``_text_stream_backend``), already gave them the text stream's view, so
the forward runs all layers as one compiled module (``_AllLayers``).

Imported by vLLM (through :func:`dpvr_kernels.vllm.register`) only when a DPVR checkpoint is served.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from . import (
    ARCHITECTURE,
    SIDE_BRANCH,
    check_side_branch_weights,
    check_vllm_version,
    checkpoint_route,
    llava_hf_key,
)

check_vllm_version()

from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.distributed import get_pp_group  # noqa: E402
from vllm.forward_context import get_forward_context  # noqa: E402
from vllm.model_executor.models.llama import LlamaDecoderLayer  # noqa: E402
from vllm.model_executor.models.llava import LlavaForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionCGSupport,
    CommonAttentionMetadata,
    subclass_attention_backend,
)
from vllm.v1.attention.backends.utils import PAD_SLOT_ID  # noqa: E402
from vllm.v1.worker.block_table import MultiGroupBlockTable  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

from ..models.attention import attend_segments  # noqa: E402
from ..ops import fuse_merge, route_split  # noqa: E402
from ..plan import build_route_plan_from_mask  # noqa: E402
from .kv_cache import (  # noqa: E402
    TextOnlyAttentionSpec,
    VisionLayout,
    VisionOnlyAttentionSpec,
    text_only_spec,
    vision_only_spec,
)

__all__ = ["DPVRLlavaForConditionalGeneration", "DPVRLlavaNextForConditionalGeneration",
           "DPVRLlavaOnevisionForConditionalGeneration", "DPVRQwen2_5_VLForConditionalGeneration", "SideBranchAttention"]

SUPPORTED_ATTENTION_BACKENDS = ("CPU_ATTN",)
"""Attention backends whose metadata rewrite is tested (vLLM's CPU build)."""

TRY_BACKEND_ENV = "DPVR_VLLM_TRY_BACKEND"
"""Set to a backend's name to serve with it although no test has run it, with a warning: how the GPU kit's vLLM stage
(``scripts/vllm_cuda_check.py``) tries a CUDA backend, whose answers it then checks."""


def _refuse_engine_settings(vllm_config: VllmConfig, name: str = ARCHITECTURE) -> None:
    """Refuse the engine settings DPVR-LF cannot serve exactly, with an error that names the fix (vLLM's defaults
    are all served)."""
    wrong = []
    if vllm_config.speculative_config is not None:
        wrong.append("no speculative decoding")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        wrong.append("pipeline_parallel_size=1 (tensor parallelism is supported)")
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        wrong.append("the hybrid KV cache manager (no --disable-hybrid-kv-cache-manager): the deep layers' text-only "
                     "KV is a KV cache group of its own")
    if vllm_config.lora_config is not None:
        wrong.append("no LoRA adapters (enable_lora=False; merge an adapter into the checkpoint instead)")
    if vllm_config.kv_transfer_config is not None:
        wrong.append("no KV connector (kv_transfer_config): a request must be prefilled here, from its own blocks")
    if wrong:
        raise ValueError(
            f"{name} (DPVR-LF) needs " + ", ".join(wrong) + "; vLLM's defaults serve it"
        )


class _Step:
    """The step's requests as the two streams see them, worked out once per step on the host from vLLM's runner,
    just before it builds the attention metadata: per request (batch order) its tokens computed before this step
    (``done``), its tokens now (``q_len``), the vision tokens among the computed ones (``vision_before``, from its
    placeholders: a request that starts from cached blocks has vision tokens before its first scheduled token).

    ``all_text``: no vision token is scheduled (every decode step, text-only prompts, prompt chunks past the
    images). Such a step needs no route: the deep layers' metadata builder (``_TextStreamBuilder``) turns their
    metadata into the text stream's view, so the forward runs all layers as one compiled module with no host work
    of its own (what CUDA graphs of a decode step need). ``text_index``: then each token's index in its request's
    text stream, ``row`` its request (the deep groups' slots are always the plugin's to write: ``_slot_mapping``)."""

    __slots__ = ("_tensors", "all_text", "done", "max_text_len", "q_len", "row", "text_index", "text_lens",
                 "vision_before")

    def __init__(self, done: list[int], q_len: list[int], vision_before: list[int], all_text: bool) -> None:
        self.done, self.q_len, self.vision_before, self.all_text = done, q_len, vision_before, all_text
        self.text_index = self.row = self.text_lens = None
        self.max_text_len = 0
        self._tensors: dict = {}
        if all_text:
            # Host arithmetic in numpy (a few small arrays); the tensors are made once per step (slot_index).
            q = np.asarray(q_len, dtype=np.int64)
            done_text = np.asarray(done, dtype=np.int64) - np.asarray(vision_before, dtype=np.int64)
            self.text_lens = done_text + q
            self.max_text_len = int(self.text_lens.max())
            self.row = np.repeat(np.arange(len(q_len)), q)
            # Token k of request i is its text token done_text_i + k.
            self.text_index = np.arange(int(q.sum())) + (done_text - (np.cumsum(q) - q))[self.row]

    def slot_index(self, device: torch.device, block_size: int) -> tuple:
        """For an all-text step's deep KV groups (made once per step, shared by all of them): each token's request
        row, block column and offset in its request's text-only blocks (numpy arrays for a CPU, else tensors)."""
        key = (device, block_size)
        if key not in self._tensors:
            split = (self.row, *np.divmod(self.text_index, block_size))
            self._tensors[key] = split if device.type == "cpu" else tuple(torch.from_numpy(a).to(device) for a in split)
        return self._tensors[key]

    def text_seq_lens(self, seq_lens: Tensor) -> Tensor:
        """``seq_lens`` (the runner's, padding rows kept) with the requests' text lengths (made once per step)."""
        if "seq_lens" not in self._tensors:
            text_lens = self._tensors["seq_lens"] = seq_lens.clone()
            text_lens[: len(self.q_len)] = torch.from_numpy(self.text_lens).to(text_lens)
        return self._tensors["seq_lens"]

    @classmethod
    def of(cls, runner, num_reqs: int) -> _Step:
        batch = runner.input_batch
        q_len = np.diff(runner.query_start_loc.np[: num_reqs + 1]).tolist()
        done = batch.num_computed_tokens_cpu[:num_reqs].tolist()
        vision_before, all_text = [], True
        for i, request_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests[request_id]
            layout = state.__dict__.get("_dpvr_vision")  # made once per request, kept on vLLM's request state
            if layout is None:
                layout = state._dpvr_vision = VisionLayout(state.mm_features)
            vision_before.append(layout.before(done[i]))
            all_text = all_text and layout.before(done[i] + q_len[i]) == vision_before[i]
        return cls(done, q_len, vision_before, all_text)


_STEP: list[_Step | None] = [None]
"""This worker's current step (set before its attention metadata is built, kept through its forward); ``None`` in
vLLM's dummy runs (profiling, warm-up, graph capture), whose tokens are all text with nothing before them."""

_DUMMY: list[bool] = [False]


def _note_step(build_attention_metadata):
    """Wraps the runner's ``_build_attention_metadata``: the step's :class:`_Step`, before any builder runs."""

    @functools.wraps(build_attention_metadata)
    def wrapper(self, *args, **kwargs):
        tables = self.input_batch.block_table
        if "_dpvr_full_groups" not in tables.__dict__ and getattr(self, "kv_cache_config", None) is not None:
            tables._dpvr_full_groups = _full_groups(self, tables)  # once per input batch (made again per KV config)
        num_reqs = kwargs["num_reqs"] if "num_reqs" in kwargs else args[1]
        real = not _DUMMY[0] and not kwargs.get("for_cudagraph_capture") and self.input_batch.num_reqs == num_reqs
        # Only a runner serving a DPVR model (stream KV groups) pays for the step's view: a stock engine in the
        # same process (the benchmark's) runs as it would alone.
        _STEP[0] = _Step.of(self, num_reqs) if real and _serves_dpvr(self) else None
        return build_attention_metadata(self, *args, **kwargs)

    wrapper._dpvr_wrapped = True
    return wrapper


def _note_dummy(dummy_run):
    """Wraps the runner's ``_dummy_run``: its batch is made up, not the input batch's requests."""

    @functools.wraps(dummy_run)
    def wrapper(self, *args, **kwargs):
        _DUMMY[0] = True
        try:
            return dummy_run(self, *args, **kwargs)
        finally:
            _DUMMY[0], _STEP[0] = False, None

    wrapper._dpvr_wrapped = True
    return wrapper


def _is_stream(group) -> bool:
    """Whether a KV cache group is one of the streams' (the deep layers' text-only or the side branch's vision-only)."""
    return isinstance(group.kv_cache_spec, (TextOnlyAttentionSpec, VisionOnlyAttentionSpec))


def _serves_dpvr(runner) -> bool:
    """Whether the runner's model is a DPVR one: its KV cache has the streams' groups (made once per runner)."""
    served = runner.__dict__.get("_dpvr_served")
    if served is None:
        config = getattr(runner, "kv_cache_config", None)
        if config is None:  # vLLM's profiling run, before the KV cache exists: its steps are dummy runs anyway
            return True
        served = runner._dpvr_served = any(map(_is_stream, config.kv_cache_groups))
    return served


def _full_groups(runner, tables: MultiGroupBlockTable) -> list | None:
    """The block tables of a DPVR model's full-layer KV groups, whose slots ``_slot_mapping`` computes on a CPU;
    ``None`` (vLLM's own per-group kernel) for other models, other devices and context parallelism."""
    groups = runner.kv_cache_config.kv_cache_groups
    if (not _serves_dpvr(runner) or len(groups) != len(tables.block_tables) or runner.device.type != "cpu"
            or any(t.dcp_world_size != 1 or t.pcp_world_size != 1 for t in tables.block_tables)):
        return None
    return [table for table, group in zip(tables.block_tables, groups, strict=True) if not _is_stream(group)]


def _slot_mapping(compute_slot_mapping):
    """Wraps ``MultiGroupBlockTable.compute_slot_mapping`` (the runner's, every step: each KV group's slot per
    scheduled token). A DPVR model has many one-layer KV groups (vLLM sizes every group to the side branch's one
    layer), and on a CPU vLLM's per-group kernel call costs about 0.17 ms of Python each: 2 ms of a 25 ms decode step
    at 13 groups, where stock's one group pays it once. So on a CPU the plugin computes the full-layer groups' slots
    itself, from one per-token row/block/offset split shared by all groups (``_compacted_slots``, vLLM's arithmetic:
    ``block_table[request, position // block_size] * block_size + position % block_size``, the rest of the buffer
    padded), and skips the deep and side-branch groups: their slots are the compacted stream slots the plugin writes
    before their layers run (``_text_slots`` in an all-text step, ``_group_metadata`` in a routed one)."""

    @functools.wraps(compute_slot_mapping)
    def wrapper(self, num_reqs: int, query_start_loc: Tensor, positions: Tensor) -> None:
        full = self.__dict__.get("_dpvr_full_groups")
        if full is None:
            return compute_slot_mapping(self, num_reqs, query_start_loc, positions)
        position = positions.numpy()  # CPU buffers: numpy views, no copies
        n = position.shape[0]
        row = np.repeat(np.arange(num_reqs), np.diff(query_start_loc[: num_reqs + 1].numpy()))
        split: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for table in full:
            size = table.block_size
            if size not in split:
                split[size] = np.divmod(position, size)
            slots = table.slot_mapping.gpu.numpy()
            _compacted_slots(table.block_table.gpu.numpy(), row, *split[size], size, out=slots[:n])
            slots[n:] = PAD_SLOT_ID
        return None

    wrapper._dpvr_wrapped = True
    return wrapper


for _owner, _name, _wrap in ((GPUModelRunner, "_build_attention_metadata", _note_step),
                             (GPUModelRunner, "_dummy_run", _note_dummy),
                             (MultiGroupBlockTable, "compute_slot_mapping", _slot_mapping)):
    if not getattr(getattr(_owner, _name), "_dpvr_wrapped", False):  # the CPU runner inherits the runner's
        setattr(_owner, _name, _wrap(getattr(_owner, _name)))


def _shares_builds(backend: type) -> bool:
    """Whether one build of ``backend``'s metadata can serve every KV group of one spec in a step (vLLM's fast path
    for hybrid models: ``update_block_table``). CPU_ATTN's metadata differs between such groups only in the block
    table and slots (its scheduler metadata depends on the step's lengths alone), so the plugin adds the method
    there: the plugin's layers span many one-layer groups (vLLM gives every group the side branch's one layer)."""
    return backend.get_builder_cls().supports_update_block_table or backend.get_name() == "CPU_ATTN"


def _with_block_table(base: type, builder, metadata, block_table: Tensor, slot_mapping: Tensor):
    if base.supports_update_block_table:
        return base.update_block_table(builder, metadata, block_table, slot_mapping)
    metadata = copy.copy(metadata)  # CPU_ATTN (a shallow copy: a tenth of dataclasses.replace's cost, every group)
    metadata.block_table, metadata.slot_mapping = block_table, slot_mapping
    return metadata


@functools.cache
def _full_layers_backend(backend: type) -> type:
    """The full layers' attention backend: ``backend``, whose metadata one build per step serves all their KV groups
    (``_shares_builds``)."""
    base = backend.get_builder_cls()
    if base.supports_update_block_table or not _shares_builds(backend):
        return backend

    class _SharedBuilder(base):
        supports_update_block_table = True

        def update_block_table(self, metadata, blk_table: Tensor, slot_mapping: Tensor):
            return _with_block_table(base, self, metadata, blk_table, slot_mapping)

    _SharedBuilder.__qualname__ = _SharedBuilder.__name__ = f"DPVRShared{base.__name__}"
    return subclass_attention_backend("DPVRShared", backend, _SharedBuilder)


@functools.cache
def _text_stream_backend(backend: type) -> type:
    """The deep layers' attention backend: ``backend`` with :class:`_TextStreamBuilder` as its metadata builder."""
    base = backend.get_builder_cls()

    class _TextStreamBuilder(base):
        """Builds the deep layers' metadata for the text stream in an all-text step (queries: each request's text
        tokens now; keys: its text tokens so far; slots: their compacted indices in the request's text-only blocks),
        the way vLLM's KV-sharing fast prefill builds some layers' metadata for a subset of the tokens. A step with
        vision tokens is routed in the forward, which builds this view after the route (``_group_metadata``). The
        view is the same in every deep KV group but for the block table and slots (``update_block_table``)."""

        supports_update_block_table = _shares_builds(backend)

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
            # Piecewise graphs only (vLLM's fallback: the layer ranges are captured, attention runs between them). A
            # full decode graph would replay the all-text forward for any batch of one-token queries, and a prompt
            # chunk of one vision token is such a query.
            return AttentionCGSupport.NEVER

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False):
            step = _STEP[0]
            if step is not None and step.all_text:
                common_attn_metadata = _text_view(step, common_attn_metadata, self.kv_cache_spec.block_size)
            return super().build(common_prefix_len, common_attn_metadata, fast_build)

        def update_block_table(self, metadata, blk_table: Tensor, slot_mapping: Tensor):
            step = _STEP[0]
            if step is not None and step.all_text:
                _text_slots(step, blk_table, slot_mapping, self.kv_cache_spec.block_size)
            return _with_block_table(base, self, metadata, blk_table, slot_mapping)

    _TextStreamBuilder.__qualname__ = _TextStreamBuilder.__name__ = f"DPVRTextStream{base.__name__}"
    return subclass_attention_backend("DPVRTextStream", backend, _TextStreamBuilder)


@functools.cache
def _side_branch_backend(backend: type) -> type:
    """The side branch's attention backend (when it keeps KV): ``backend``, whose builder skips the build in an
    all-text step, where the side branch does not run (its last metadata stands in, unread)."""
    base = backend.get_builder_cls()

    class _SideBranchBuilder(base):
        _last = None

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False):
            step = _STEP[0]
            if step is None or not step.all_text or self._last is None:
                self._last = super().build(common_prefix_len, common_attn_metadata, fast_build)
            return self._last

    _SideBranchBuilder.__qualname__ = _SideBranchBuilder.__name__ = f"DPVRSideBranch{base.__name__}"
    return subclass_attention_backend("DPVRSideBranch", backend, _SideBranchBuilder)


def _compacted_slots(block_table, row, column, offset, block_size: int, out):
    """Writes into ``out`` the KV slots of tokens at indices ``column * block_size + offset`` of their requests'
    (``row``) blocks: a stream's compacted indices, or a full group's positions. Tensors, or numpy arrays (the CPU
    runner's buffers, where a numpy op costs a tenth of a torch one's dispatch)."""
    out[:] = block_table[row, column]
    out *= block_size
    out += offset
    return out


def _text_slots(step: _Step, block_table: Tensor, slot_mapping: Tensor, block_size: int) -> None:
    """Writes an all-text step's compacted text-stream slots for one deep KV group into its slot mapping (the runner's
    buffer for the group, which the layers read from the forward context)."""
    row, column, offset = step.slot_index(slot_mapping.device, block_size)
    if slot_mapping.device.type == "cpu":  # numpy views of the runner's buffers: no torch dispatch per op
        block_table, slot_mapping = block_table.numpy(), slot_mapping.numpy()
    _compacted_slots(block_table, row, column, offset, block_size, out=slot_mapping[: len(row)])


def _text_view(step: _Step, cm: CommonAttentionMetadata, block_size: int) -> CommonAttentionMetadata:
    """One deep KV group's metadata of an all-text step as the text stream sees it (its slots rewritten in place)."""
    _text_slots(step, cm.block_table_tensor, cm.slot_mapping, block_size)
    cm = copy.copy(cm)  # a shallow copy, as vLLM's runner makes one per KV group
    cm.seq_lens, cm.max_seq_len = step.text_seq_lens(cm.seq_lens), step.max_text_len
    if getattr(cm, "seq_lens_cpu_upper_bound", None) is not None:
        upper = cm.seq_lens_cpu_upper_bound = cm.seq_lens_cpu_upper_bound.clone()
        upper.numpy()[: len(step.q_len)] = step.text_lens
    return cm


class SideBranchAttention(nn.Module):
    """Stands in for the side branch's vLLM ``Attention``: causal attention within each request's vision
    tokens (a sliding window over original positions where the backbone has one), never KV-cached.

    The caller sets ``segments`` (vision tokens per request, in order) and ``positions`` before each call.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale, self.window = scale, window
        self.segments: tuple[int, ...] = ()
        self.positions: Tensor | None = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        n = query.shape[0]
        if sum(self.segments) != n:
            raise RuntimeError(f"side branch: segments {self.segments} do not cover the {n} vision tokens")
        q = query.view(n, self.num_heads, self.head_size).transpose(0, 1)
        k = key.view(n, self.num_kv_heads, self.head_size).transpose(0, 1)
        v = value.view(n, self.num_kv_heads, self.head_size).transpose(0, 1)
        out = attend_segments(q, k, v, self.segments, self.scale, window=self.window, positions=self.positions)
        return out.reshape(n, self.num_heads * self.head_size)


class _LayerRange(nn.Module):
    """Consecutive decoder layers on one token set, as one module that vLLM compiles (its default compilation
    mode: Dynamo + Inductor, attention left as vLLM's own op between compiled pieces). The routing between the
    ranges is host logic (plan, metadata) and stays eager, the way vLLM's KV-sharing fast prefill splits Gemma3n
    into compiled decoders around an eager subset step. The layers are held in a plain list: their weights stay
    registered (and loaded) where the stock model has them."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers: list[nn.Module],
                 norm: nn.Module | None = None):
        super().__init__()
        self.layers = list(layers)
        self.norm = [norm] if norm is not None else []  # a list too: the decoder's norm, not a copy

    def run(self, positions: Tensor, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The layers in order, then the norm if the range has one (an uncompiled range's forward)."""
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if self.norm:
            hidden_states, residual = self.norm[0](hidden_states, residual)
        return hidden_states, residual

    forward = run


# One class per range, each with a forward of its own: vLLM keys a compiled module's on-disk (AOT) artifacts by its
# forward's qualified name and line, so ranges sharing one forward would overwrite each other's compiled code.
_DYNAMIC = {"positions": -1, "hidden_states": 0, "residual": 0}  # positions: [N], or [3, N] M-RoPE rows


@support_torch_compile(dynamic_arg_dims=_DYNAMIC)
class _FullLayers(_LayerRange):
    """Layers ``[0, r)``: every token."""

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.run(positions, hidden_states, residual)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC)
class _TextStream(_LayerRange):
    """Layers ``[r, N-f)``: the text tokens, with the deep layers' own attention metadata in the forward context."""

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.run(positions, hidden_states, residual)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC)
class _FusionLayers(_LayerRange):
    """Layers ``[N-f, N)`` and the final norm: every token."""

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.run(positions, hidden_states, residual)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC)
class _SideBranch(_LayerRange):
    """The side branch's one layer: the vision tokens, with its own KV group's metadata in the forward context (the
    engine keeps side-branch KV: chunked prefill or prefix caching on). Compiled like the ranges: eager, it took
    16.6 ms per 576 vision tokens on a CPU, a compiled layer about 14.7 ms."""

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.run(positions, hidden_states, residual)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC)
class _AllLayers(_LayerRange):
    """Layers ``[0, N)`` and the final norm: an all-text step (every decode step), which needs no route, as one
    compiled call instead of the three ranges' (each compiled call has its own dispatch and guard cost, about a
    millisecond of a CPU decode step)."""

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.run(positions, hidden_states, residual)


def _side_branch_layer(layer_cls: type, vllm_config: VllmConfig, prefix: str, config) -> nn.Module:
    """A new decoder layer of the backbone's class (the two constructors vLLM's Llama and Qwen2 layers have)."""
    if issubclass(layer_cls, LlamaDecoderLayer):
        return layer_cls(vllm_config=vllm_config, prefix=prefix, config=config)
    if issubclass(layer_cls, Qwen2DecoderLayer):
        return layer_cls(config=config, cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                         prefix=prefix)
    raise NotImplementedError(
        f"the backbone's decoder layer is {layer_cls.__name__}; the plugin supports Llama-family (LlamaDecoderLayer "
        "and its subclasses: Vicuna, Mistral) and Qwen2 (Qwen2DecoderLayer) backbones"
    )


def _text_only_kv_cache_spec(attn: nn.Module, vllm_config: VllmConfig):
    return text_only_spec(type(attn).get_kv_cache_spec(attn, vllm_config))


def _vision_only_kv_cache_spec(attn: nn.Module, vllm_config: VllmConfig):
    return vision_only_spec(type(attn).get_kv_cache_spec(attn, vllm_config))


class _DPVRForConditionalGeneration:
    """DPVR-LF on one of vLLM's LLaVA-family classes (mixed in before it): route at layer ``r``, a one-layer side
    branch, text-only layers ``[r, N-f)`` with a text-only KV cache, fusion layers ``[N-f, N)``. Settings from
    ``config.dpvr`` of the checkpoint. The vision tokens are vLLM's own placeholders of the step (image tiles and
    newline rows included, as the HF class counts them), so any class whose decoder is ``language_model.model``
    works the same way."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _refuse_engine_settings(vllm_config, type(self).__name__)
        config = vllm_config.model_config.hf_config
        saved = getattr(config, "dpvr", None)
        if not isinstance(saved, dict):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's config.json has no 'dpvr' settings; save the model after "
                "dpvr_kernels.patch(model) with save_pretrained, then dpvr_kernels.vllm.prepare_checkpoint(path)"
            )
        text_config = config.text_config
        decoder = self.language_model.model
        num_layers = len(decoder.layers)
        try:
            self.route_layer, self.fusion_layers, self.backend = checkpoint_route(saved, num_layers)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        layer_cls = type(decoder.layers[0])
        window = getattr(text_config, "sliding_window", None)
        if window is not None and vllm_config.model_config.max_model_len > window:
            raise ValueError(
                f"{type(self).__name__}: the backbone has a sliding window of {window} positions, and the text-only KV "
                f"cache cannot apply it over original positions; set max_model_len <= {window}"
            )

        # The side branch: a layer of the backbone's own class (weights from the checkpoint's side branch). A prompt
        # prefilled whole meets the side branch in one step: its vLLM Attention is replaced by uncached varlen
        # attention and taken out of the KV cache registry. Under chunked prefill a later chunk's vision tokens
        # attend to earlier chunks', and with prefix caching to a cached prefix's: the side branch keeps its vLLM
        # Attention with a KV cache spec of its own (kv_cache.py: blocks for vision tokens only), its vision tokens
        # at compacted slots, like the text stream.
        side_prefix = f"{prefix + '.' if prefix else ''}language_model.model.{SIDE_BRANCH}.{self.route_layer}"
        try:
            side = _side_branch_layer(layer_cls, vllm_config, side_prefix, text_config)
        except NotImplementedError as e:
            raise NotImplementedError(f"{type(self).__name__}: {e}") from None
        self._side_kv = bool(vllm_config.scheduler_config.enable_chunked_prefill
                             or vllm_config.cache_config.enable_prefix_caching)
        self._side_name = side.self_attn.attn.layer_name
        if self._side_kv:
            attn = side.self_attn.attn
            attn.get_kv_cache_spec = functools.partial(_vision_only_kv_cache_spec, attn)
            attn.attn_backend = _side_branch_backend(attn.attn_backend)
        else:
            stock_attn = side.self_attn.attn
            vllm_config.compilation_config.static_forward_context.pop(stock_attn.layer_name)
            side.self_attn.attn = SideBranchAttention(stock_attn.num_heads, stock_attn.num_kv_heads,
                                                      stock_attn.head_size, stock_attn.impl.scale, window)
        setattr(decoder, SIDE_BRANCH, side)

        backend = decoder.layers[0].self_attn.attn.get_attn_backend().get_name()
        if backend not in SUPPORTED_ATTENTION_BACKENDS:
            if os.environ.get(TRY_BACKEND_ENV) != backend:
                raise NotImplementedError(
                    f"{type(self).__name__}: the deep layers' text-only attention metadata is implemented and tested for "
                    f"the {SUPPORTED_ATTENTION_BACKENDS} attention backend(s) (vLLM's CPU build); this engine uses "
                    f"{backend}"
                )
            logging.getLogger(__name__).warning("%s: serving with the untested attention backend %s (%s=%s): check "
                                                "its answers against HF", type(self).__name__, backend,
                                                TRY_BACKEND_ENV, backend)
        self.deep_layers = range(self.route_layer, num_layers - self.fusion_layers)
        self._deep_names = [decoder.layers[i].self_attn.attn.layer_name for i in self.deep_layers]
        # The three layer ranges as modules vLLM compiles (unless enforce_eager): [0, r), [r, N-f), [N-f, N) + norm.
        from vllm.compilation.backends import set_model_tag

        base = f"{prefix + '.' if prefix else ''}language_model.model.dpvr"
        layers = list(decoder.layers)
        with set_model_tag("dpvr_full_layers"):
            self._full_layers = (_FullLayers(vllm_config=vllm_config, prefix=f"{base}.full_layers",
                                             layers=layers[: self.route_layer]) if self.route_layer else None)
        with set_model_tag("dpvr_text_stream"):
            self._text_stream = _TextStream(vllm_config=vllm_config, prefix=f"{base}.text_stream",
                                            layers=[layers[i] for i in self.deep_layers])
        with set_model_tag("dpvr_fusion_layers"):
            self._fusion_layers = _FusionLayers(vllm_config=vllm_config, prefix=f"{base}.fusion_layers",
                                                layers=layers[num_layers - self.fusion_layers :], norm=decoder.norm)
        with set_model_tag("dpvr_all_layers"):
            self._all_layers = _AllLayers(vllm_config=vllm_config, prefix=f"{base}.all_layers", layers=layers,
                                          norm=decoder.norm)
        # With side-branch KV the side branch is a vLLM Attention layer and compiles like a range; without it, its
        # attention is per-request segments set from the host (SideBranchAttention), and it stays eager.
        side_range = _SideBranch if self._side_kv else _LayerRange
        with set_model_tag("dpvr_side_branch"):
            self._side_branch = side_range(vllm_config=vllm_config, prefix=f"{base}.side_branch", layers=[side])
        for i in self.deep_layers:  # their own KV cache group, blocks for text tokens only (kv_cache.py)
            attn = decoder.layers[i].self_attn.attn
            attn.get_kv_cache_spec = functools.partial(_text_only_kv_cache_spec, attn)
            attn.attn_backend = _text_stream_backend(attn.attn_backend)  # their metadata: the text stream's view
        for i in [*range(self.route_layer), *range(num_layers - self.fusion_layers, num_layers)]:
            attn = decoder.layers[i].self_attn.attn
            attn.attn_backend = _full_layers_backend(attn.attn_backend)  # one build serves all their KV groups
        # A fusion layer is always full attention (layer 0 is a deep layer when r = 0): its metadata gives a routed
        # step's query starts.
        self._full_name = decoder.layers[num_layers - 1].self_attn.attn.layer_name
        self._vllm_config = vllm_config
        self._builders: dict[tuple[str, ...], object] = {}
        # vLLM's own mask of the step's multimodal placeholder positions (the vision tokens), from embed_input_ids.
        # Not input_ids == image_token_id: a generated token may carry that id, and vLLM embeds it as text.
        self._vision_mask: Tensor | None = None

    # ------------------------------------------------------------------------------------------- weights

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        # Both CLIP tower layouts load (llava_hf_key). vLLM does not report a linear layer's missing weights, so a
        # checkpoint whose side branch is incomplete would serve uninitialised weights: refuse it by name.
        names: list[str] = []

        def renamed():
            for name, tensor in weights:
                names.append(name)
                yield llava_hf_key(name), tensor

        loaded = super().load_weights(renamed())
        try:
            check_side_branch_weights(names, self.route_layer)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        return loaded

    # ------------------------------------------------------------------------------------------- forward

    def embed_input_ids(self, input_ids: Tensor, multimodal_embeddings=None, *,
                        is_multimodal: Tensor | None = None) -> Tensor:
        # vLLM's runner calls this for every step, just before forward(), with the step's scheduled tokens.
        self._vision_mask = is_multimodal if is_multimodal is not None else torch.zeros_like(input_ids, dtype=bool)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **kwargs: object) -> Tensor:
        if not get_pp_group().is_first_rank or intermediate_tensors is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support pipeline parallelism")
        decoder = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else decoder.embed_input_ids(input_ids)
        # The residual stream starts at zero: layer 0 adds its input to it exactly as a stock layer with no residual
        # does, and every compiled range gets a tensor.
        residual = torch.zeros_like(hidden)
        step = _STEP[0]
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata or step is None or step.all_text:
            # Every token text (decode steps, text-only prompts, vLLM's dummy runs): no route; the deep layers'
            # metadata is the text stream's view already (_TextStreamBuilder). Nothing here reads the device.
            self._vision_mask = None
            if step is None:  # a dummy run (profiling, warm-up, graph capture): the routed path's ranges compile too
                self._ranges(positions, hidden, residual, None, None)
            return self._all_layers(positions, hidden, residual)[0]
        return self._ranges(positions, hidden, residual, step, attn_metadata)

    def _ranges(self, positions: Tensor, hidden: Tensor, residual: Tensor, step: _Step | None,
                attn_metadata: dict | None) -> Tensor:
        """The routed forward: ``[0, r)``, route, side branch and text stream, fuse, ``[N-f, N)`` (``step``
        None: the three ranges back to back, a dummy run's warm-up of their compiled code)."""
        if self._full_layers is not None:
            hidden, residual = self._full_layers(positions, hidden, residual)
        if step is None:
            hidden, residual = self._text_stream(positions, hidden, residual)
            if self._side_kv:
                hidden, residual = self._side_branch(positions, hidden, residual)
        else:
            hidden, residual = self._route_text_stream_and_fuse(step, positions, hidden, residual, attn_metadata)
        hidden, _ = self._fusion_layers(positions, hidden, residual)
        return hidden

    def _route_text_stream_and_fuse(self, step: _Step, positions: Tensor, hidden: Tensor, residual: Tensor,
                                    attn_metadata: dict) -> tuple[Tensor, Tensor]:
        decoder = self.language_model.model
        n = hidden.shape[0]
        num_reqs = len(step.q_len)
        full = attn_metadata[self._full_name]
        if full.query_start_loc.numel() - 1 != num_reqs:
            raise RuntimeError(
                f"{type(self).__name__}: the step's requests are unknown (the runner's batch has {num_reqs} requests, "
                f"the attention metadata {full.query_start_loc.numel() - 1}; is the model called outside vLLM's model "
                "runner?); please report this with the engine arguments"
            )
        num_actual = sum(step.q_len)
        marked, self._vision_mask = self._vision_mask, None
        if marked is None or marked.numel() != num_actual:
            raise RuntimeError(
                f"{type(self).__name__}: the vision-token mask of this step ({num_actual} tokens) is missing or stale: vLLM's "
                "runner did not call embed_input_ids before forward, which vLLM 0.32's runner does for every "
                "multimodal step; please report this with the engine arguments"
            )
        query_start = full.query_start_loc.to(torch.long)
        token = torch.arange(n, device=hidden.device)
        # One sequence per request; tokens past the scheduled ones (padding) are pad.
        sequence = (torch.bucketize(token, query_start[1:].to(hidden.device), right=True)).clamp(max=num_reqs - 1)
        valid = token < num_actual
        vision = torch.zeros_like(valid)
        vision[:num_actual] = marked.to(device=valid.device, dtype=torch.bool)
        # Positions [N], or M-RoPE rows [3, N] (Qwen-VL): the plan gathers them per token either way.
        plan = build_route_plan_from_mask(vision[None], valid[None], positions[..., None, :], sequence[None])
        text_h, vision_h = route_split(hidden[None], plan, backend=self.backend)
        text_r, vision_r = route_split(residual[None], plan, backend=self.backend)

        text_layout, vision_layout = self._stream_layouts(step, list(plan.text_seqlens))
        if plan.num_text:
            text_h, text_r = self._run_text_stream(attn_metadata, text_layout, plan.text_position_ids, text_h, text_r)
        if plan.num_vision:
            if self._side_kv:  # the side branch's own KV: this step's vision tokens after the request's earlier ones
                view = self._stream_view(vision_layout)
                metadata = {self._side_name: self._group_metadata(attn_metadata[self._side_name], view)}
                with self._swapped_metadata(metadata, [self._side_name]):
                    vision_h, vision_r = self._side_branch(plan.vision_position_ids, vision_h, vision_r)
            else:
                attn = getattr(decoder, SIDE_BRANCH).self_attn.attn
                attn.segments = plan.vision_seqlens
                attn.positions = plan.vision_position_ids.reshape(-1, plan.num_vision)[0]  # windows
                vision_h, vision_r = self._side_branch(plan.vision_position_ids, vision_h, vision_r)
        hidden = fuse_merge(text_h, vision_h, hidden[None], plan, backend=self.backend)[0]
        residual = fuse_merge(text_r, vision_r, residual[None], plan, backend=self.backend)[0]
        return hidden, residual

    def _run_text_stream(self, attn_metadata: dict, layout: tuple[list[int], ...], positions: Tensor, hidden: Tensor,
                         residual: Tensor) -> tuple[Tensor, Tensor]:
        """Layers ``[r, N-f)`` on the text tokens, each deep KV group reading the text stream's view of the step."""
        # vLLM gives KV cache groups equal layer counts, so the deep layers may span several groups (r small against
        # N): each group has its own block table, hence its own slots; the rest of the view is shared.
        view = self._stream_view(layout)
        groups: dict[int, list[str]] = {}
        for name in self._deep_names:
            groups.setdefault(id(attn_metadata[name]), []).append(name)
        metadata = {name: meta for names in groups.values()
                    for meta in [self._group_metadata(attn_metadata[names[0]], view)] for name in names}
        with self._swapped_metadata(metadata, self._deep_names):
            return self._text_stream(positions, hidden, residual)

    @contextlib.contextmanager
    def _swapped_metadata(self, metadata: dict[str, CommonAttentionMetadata], names: list[str]):
        """Within the block, the layers ``metadata`` names read it (built by the backend's own builder) and its
        slots from the forward context: the text stream's or the side branch's view of the step."""
        ctx = get_forward_context()
        saved_metadata, saved_slots = ctx.attn_metadata, ctx.slot_mapping
        builder = self._builder(tuple(names))
        built: dict[int, object] = {}
        for meta in metadata.values():  # one build; the other KV groups' differ in block table and slots only
            if id(meta) in built:
                continue
            first = next(iter(built.values()), None)
            built[id(meta)] = (builder.update_block_table(first, meta.block_table_tensor, meta.slot_mapping)
                               if first is not None and builder.supports_update_block_table
                               else builder.build(0, meta))
        ctx.attn_metadata = {**saved_metadata, **{name: built[id(meta)] for name, meta in metadata.items()}}
        ctx.slot_mapping = {**saved_slots, **{name: meta.slot_mapping for name, meta in metadata.items()}}
        try:
            yield
        finally:
            ctx.attn_metadata, ctx.slot_mapping = saved_metadata, saved_slots

    def _builder(self, names: tuple[str, ...]):
        """The backend's own metadata builder for these layers (made once, at the first step that needs it)."""
        if names not in self._builders:
            layer = get_forward_context().no_compile_layers[names[0]]
            backend = layer.get_attn_backend()
            spec = dataclasses.replace(layer.get_kv_cache_spec(self._vllm_config), block_size=self._block_size())
            self._builders[names] = backend.get_builder_cls()(spec, list(names), self._vllm_config,
                                                              layer.kv_cache.device)
        return self._builders[names]

    def _block_size(self) -> int:
        # CPU layout: [num_blocks, num_kv_heads, block_size, 2 * head_size]
        return get_forward_context().no_compile_layers[self._deep_names[0]].kv_cache.shape[2]

    def _stream_layouts(self, step: _Step, q_text: list[int]) -> tuple[tuple[list[int], ...], tuple[list[int], ...]]:
        """The text stream's and the side branch's view of a routed step, per request with such tokens (the kept
        ones): its row, its queries now, and its tokens of that kind already in the stream's KV. A request's earlier
        tokens (earlier chunks, its decoded tokens, or a prefix-cache hit) are split into text and vision by its
        placeholders (``step.vision_before``). ``q_text``: each request's text tokens in this step."""
        num_reqs, done, vision_before = len(step.q_len), step.done, step.vision_before
        q_vision = [q - t for q, t in zip(step.q_len, q_text, strict=True)]
        for i in range(num_reqs):
            if q_vision[i] and vision_before[i] and not self._side_kv:
                raise RuntimeError(
                    f"{type(self).__name__}: a request has {q_vision[i]} vision tokens after {vision_before[i]} earlier "
                    "ones, so its prompt was prefilled in pieces although the side branch keeps no KV (chunked "
                    "prefill and prefix caching off); please report this with the engine arguments"
                )
        text = [i for i in range(num_reqs) if q_text[i]]
        vision = [i for i in range(num_reqs) if q_vision[i]]
        return ((text, [q_text[i] for i in text], [done[i] - vision_before[i] for i in text]),
                (vision, [q_vision[i] for i in vision], [vision_before[i] for i in vision]))

    def _stream_view(self, layout: tuple[list[int], ...]) -> tuple:
        """The part of one stream's view of this step that every KV group shares: per kept request its queries, its
        keys so far (in that stream's tokens), and each query's compacted index in the request's blocks."""
        keep, q_stream, before = layout
        q = torch.tensor(q_stream, dtype=torch.int32)
        seq = torch.tensor([b + t for b, t in zip(before, q_stream, strict=True)], dtype=torch.int32)
        query_start = torch.zeros(len(keep) + 1, dtype=torch.int32)
        torch.cumsum(q, 0, out=query_start[1:])
        # Token k of kept request j sits at compacted index before[j] + k of that request's blocks.
        row = torch.repeat_interleave(torch.arange(len(keep)), q.long())
        index = torch.arange(int(query_start[-1])) + (torch.tensor(before, dtype=torch.long)
                                                     - query_start[:-1].long())[row]
        return keep, query_start, seq, row, index, (max(q_stream) if keep else 0, int(seq.max()) if keep else 0)

    def _group_metadata(self, group_step, view: tuple) -> CommonAttentionMetadata:
        """One stream's view of this step in one KV cache group, for the backend's metadata builder: the shared view
        (``_stream_view``) with the group's block table and the compacted slots of the stream's tokens in it."""
        keep, query_start, seq, row, index, (max_query, max_seq) = view
        device = group_step.block_table.device
        block_size = self._block_size()
        block_table = group_step.block_table[keep]
        slots = _compacted_slots(block_table, row.to(device), (index // block_size).to(device),
                                 (index % block_size).to(device), block_size,
                                 out=torch.empty(row.numel(), dtype=torch.long, device=device))
        return CommonAttentionMetadata(
            query_start_loc=query_start.to(device),
            query_start_loc_cpu=query_start,
            seq_lens=seq.to(device),
            num_reqs=len(keep),
            num_actual_tokens=int(query_start[-1]),
            max_query_len=max_query,
            max_seq_len=max_seq,
            block_table_tensor=block_table,
            slot_mapping=slots.to(group_step.slot_mapping.dtype),
            causal=True,
        )


class DPVRLlavaForConditionalGeneration(_DPVRForConditionalGeneration, LlavaForConditionalGeneration):
    """vLLM's LLaVA (LLaVA-1.5, BakLLaVA) with DPVR-LF."""


class DPVRLlavaNextForConditionalGeneration(_DPVRForConditionalGeneration, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT (anyres tiles, image-newline rows: all vision tokens) with DPVR-LF."""


class DPVRLlavaOnevisionForConditionalGeneration(_DPVRForConditionalGeneration,
                                                 LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision (Qwen2 decoder; anyres images and pooled video frames: all vision tokens) with
    DPVR-LF."""


class DPVRQwen2_5_VLForConditionalGeneration(_DPVRForConditionalGeneration, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL (Qwen2 decoder, M-RoPE positions ``[3, N]`` from vLLM, gathered per token like 1-D ones)
    with DPVR-LF."""
