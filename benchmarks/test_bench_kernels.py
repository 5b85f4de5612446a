"""Speed of the route kernels against what a user would write instead, on a LLaVA-1.5 batch.

Layout: B=8 samples of L=640 tokens, one image (576 tokens, positions 5..580) per sample, the rest text,
generate-style left padding of a few tokens on some samples, D=4096. fp32 on CPU, bf16 on CUDA.

Run::

    pytest benchmarks/test_bench_kernels.py --benchmark-only [-q] [--benchmark-json out.json]
    DPVR_BENCH_OUT=benchmarks/results/kernels_cpu.md pytest benchmarks/test_bench_kernels.py --benchmark-only

Groups (each printed by benchmarks/conftest.py next to its baseline, from the same run):

* ``route_split``: the kernel per backend vs two ``index_select`` (baseline), boolean-mask indexing,
  flash-attn style ``index_first_axis`` (``torch.gather`` with an expanded index) and a plain copy of the same
  bytes (the ceiling), both as ``clone()`` (fresh allocation, like every other case) and as ``copy_`` into a
  preallocated buffer (no allocation: the memory-bandwidth ceiling).
* ``fuse_merge``: the kernel per backend vs ``base.clone()`` + two ``index_copy_`` (baseline) and a plain copy
  of ``B * L * D`` elements (ceiling, fresh and preallocated).

Bytes are the useful traffic: every packed/output row read once and written once.
The plan and all masks / buffers are built outside the timed region. On CUDA each call is timed with device
events (``conftest.measure``); the "of copy" column is the bandwidth against ``copy_`` into a preallocated
buffer, the device-copy ceiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from shapes import CUDA, DEVICE, DTYPE, DTYPE_NAME
from timing import measure
from torch import Tensor

import dpvr_kernels
from dpvr_kernels.ops import _extension
from dpvr_kernels.ops.backends import triton_available

try:
    import resource
except ImportError:  # not on Unix: no page-fault counts
    resource = None

B, L, D = 8, 640, 4096
IMAGE_START, NUM_IMAGE_TOKENS = 5, 576  # one image at positions 5..580
IMAGE_TOKEN_ID = 32000  # llava-1.5's <image>
LEFT_PAD = (0, 1, 0, 2, 0, 0, 3, 0)  # generate-style left padding (a few pad tokens, before the image)

SHAPE = f"B={B} L={L} D={D} {DTYPE_NAME}"
SPLIT_GROUP = f"route_split {SHAPE}"
MERGE_GROUP = f"fuse_merge {SHAPE}"

# Each CPU call moves ~170 MB (~10-30 ms on 2 cores); a CUDA call is tens of microseconds.
ROUNDS = 400 if CUDA else 25
WARMUP = 10 if CUDA else 2

BACKENDS = ("cpu", "torch", "triton", "cuda")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _backend_skip_reason(backend: str) -> str | None:
    if backend == "triton":
        if not CUDA:
            return "Triton on CPU only runs under the interpreter (far too slow to benchmark)"
        if not triton_available(DEVICE):
            return "triton is not installed"
    if backend == "cuda":
        if not CUDA:
            return "no CUDA device"
        if not _extension.has_cuda():
            return "dpvr_kernels._C was built without its CUDA kernels"
    if backend == "cpu":
        if CUDA:
            return "tensors are on CUDA"
        if not _extension.available():
            return f"dpvr_kernels._C is not available ({_extension.unavailable_reason()})"
    return None


def index_first_axis(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of ``x`` ``[N, D]`` via ``torch.gather`` with the index expanded over D.

    What flash-attn's ``bert_padding.index_first_axis`` does (conceptually) to unpad a batch.
    """
    return torch.gather(x, 0, index[:, None].expand(-1, x.shape[1]))


@dataclass
class Batch:
    hidden: Tensor  # [B, L, D]
    plan: dpvr_kernels.RoutePlan
    text_mask: Tensor  # bool [B, L]
    image_mask: Tensor  # bool [B, L]
    text: Tensor  # [T, D], own buffer
    image: Tensor  # [V, D], own buffer
    base: Tensor  # [B, L, D], the merge's pad-row source (other values than hidden)

    @property
    def esize(self) -> int:
        return self.hidden.element_size()

    @property
    def packed_rows(self) -> int:
        return self.plan.num_text + self.plan.num_vision


def _layout() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, IMAGE_TOKEN_ID, (B, L), generator=g)
    input_ids[:, IMAGE_START : IMAGE_START + NUM_IMAGE_TOKENS] = IMAGE_TOKEN_ID
    attention_mask = torch.ones(B, L, dtype=torch.long)
    for b, pad in enumerate(LEFT_PAD):
        attention_mask[b, :pad] = 0
        input_ids[b, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


@pytest.fixture(scope="module")
def batch() -> Batch:
    input_ids, attention_mask, position_ids = (t.to(DEVICE) for t in _layout())
    plan = dpvr_kernels.build_route_plan(input_ids, attention_mask, IMAGE_TOKEN_ID, position_ids)
    assert plan.num_vision == B * NUM_IMAGE_TOKENS, plan
    hidden = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    valid = attention_mask.bool()
    image_mask = (input_ids == IMAGE_TOKEN_ID) & valid
    text_mask = valid & ~image_mask
    flat = hidden.view(-1, D)
    text = flat.index_select(0, plan.text_index)
    image = flat.index_select(0, plan.vision_index)
    _sync()
    base = torch.randn_like(hidden)
    return Batch(hidden, plan, text_mask, image_mask, text, image, base)


def _faults_note(benchmark, fn: Callable[[], object], calls: int = 3) -> str:
    """Minor page faults per call (CPU only), measured on a few untimed calls after the timed ones.

    On CPU a fresh output of this size is a new mmap (glibc's threshold is at most 32 MiB), so every call
    faults in and zeroes its output pages; this column shows how much of a case's time that can explain.
    """
    if CUDA or resource is None or getattr(benchmark, "disabled", False):
        return ""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // calls
    benchmark.extra_info["minor_faults_per_call"] = faults
    return f"; {faults} page faults/call"


# ----------------------------------------------------------------------------------------- route_split

SPLIT_CASES = (
    "index_select x2",
    "bool mask x2",
    "index_first_axis x2 (gather)",
    *(f"route_split[{b}]" for b in BACKENDS),
    "dpvr_C raw op",
    "copy: clone",
    "copy: copy_ preallocated",
)


def _split_fn(case: str, bt: Batch) -> tuple[Callable[[], object], str]:
    hidden, plan = bt.hidden, bt.plan
    flat = hidden.view(-1, D)
    ti, ii = plan.text_index, plan.vision_index
    n = bt.packed_rows
    if case == "index_select x2":
        return (lambda: (flat.index_select(0, ti), flat.index_select(0, ii))), "two launches / passes"
    if case == "bool mask x2":
        tm, im = bt.text_mask, bt.image_mask
        return (lambda: (hidden[tm], hidden[im])), "nonzero + index (device sync on CUDA)"
    if case == "index_first_axis x2 (gather)":
        return (
            lambda: (index_first_axis(flat, ti), index_first_axis(flat, ii))
        ), "flash-attn bert_padding style"
    if case.startswith("route_split["):
        backend = case[len("route_split[") : -1]
        reason = _backend_skip_reason(backend)
        if reason:
            pytest.skip(reason)
        return (lambda: dpvr_kernels.route_split(hidden, plan, backend=backend)), "one pass, both streams"
    if case == "dpvr_C raw op":
        if not _extension.available() or (CUDA and not _extension.has_cuda()):
            pytest.skip("dpvr_kernels._C is not available for this device")
        gi = plan.gather_index
        return (
            lambda: torch.ops.dpvr_C.route_split(hidden, gi)
        ), "extension kernel without the custom-op wrapper"
    if case == "copy: clone":
        src = flat[:n]
        return (lambda: src.clone()), "ceiling, fresh output like the cases above"
    if case == "copy: copy_ preallocated":
        src = flat[:n]
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch outside the timed region
        return (lambda: dst.copy_(src)), "ceiling without allocation / page faults"
    raise AssertionError(case)


def _check_split(case: str, out, bt: Batch) -> None:
    if case.startswith("copy"):
        return
    if isinstance(out, Tensor):  # raw op: one packed buffer
        text, image = out[: bt.plan.num_text], out[bt.plan.num_text :]
    else:
        text, image = out
    assert torch.equal(text, bt.text) and torch.equal(image, bt.image), f"{case}: wrong result"


def _time_and_record(benchmark, record, fn, note: str, group: str, case: str, baseline: bool, nbytes: int) -> None:
    """Time ``fn`` (after the untimed correctness check) and add its row to the group's table."""
    _sync()
    benchmark.group = group
    benchmark.extra_info.update(bytes_moved=nbytes, device=str(DEVICE), dtype=DTYPE_NAME)
    measure(benchmark, fn, rounds=ROUNDS, warmup=WARMUP)
    note += _faults_note(benchmark, fn)
    record(benchmark, group=group, name=case, baseline=baseline, ceiling=case == "copy: copy_ preallocated",
           bytes_moved=nbytes, note=note)


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_route_split(benchmark, record, batch, case):
    fn, note = _split_fn(case, batch)
    _check_split(case, fn(), batch)  # correctness, outside the timed region
    _time_and_record(benchmark, record, fn, note, SPLIT_GROUP, case, case == "index_select x2",
                     2 * batch.packed_rows * D * batch.esize)


# ----------------------------------------------------------------------------------------- fuse_merge

MERGE_CASES = (
    "clone + index_copy_ x2",
    *(f"fuse_merge[{b}]" for b in BACKENDS),
    "dpvr_C raw op",
    "copy: clone",
    "copy: copy_ preallocated",
)


def _merge_fn(case: str, bt: Batch) -> tuple[Callable[[], object], str]:
    base, plan, text, image = bt.base, bt.plan, bt.text, bt.image
    ti, ii = plan.text_index, plan.vision_index
    if case == "clone + index_copy_ x2":

        def clone_index_copy():
            out = base.clone()
            flat = out.view(-1, D)
            flat.index_copy_(0, ti, text)
            flat.index_copy_(0, ii, image)
            return out

        return clone_index_copy, "writes text/image rows twice"
    if case.startswith("fuse_merge["):
        backend = case[len("fuse_merge[") : -1]
        reason = _backend_skip_reason(backend)
        if reason:
            pytest.skip(reason)
        return (
            lambda: dpvr_kernels.fuse_merge(text, image, base, plan, backend=backend)
        ), "each row written once"
    if case == "dpvr_C raw op":
        if not _extension.available() or (CUDA and not _extension.has_cuda()):
            pytest.skip("dpvr_kernels._C is not available for this device")
        mi = plan.merge_index
        return (
            lambda: torch.ops.dpvr_C.fuse_merge(text, image, base, mi, B, L)
        ), "extension kernel without the custom-op wrapper"
    if case == "copy: clone":
        return (lambda: base.clone()), "ceiling, fresh output like the cases above"
    if case == "copy: copy_ preallocated":
        dst = torch.empty_like(base)
        dst.copy_(base)  # first touch outside the timed region
        return (lambda: dst.copy_(base)), "ceiling without allocation / page faults"
    raise AssertionError(case)


@pytest.mark.parametrize("case", MERGE_CASES)
def test_fuse_merge(benchmark, record, batch, case):
    fn, note = _merge_fn(case, batch)
    if not case.startswith("copy"):
        # Text/image rows come back from the streams (taken from hidden), pad rows from base.
        expected = torch.where(batch.plan.pad_mask[..., None], batch.base, batch.hidden)
        assert torch.equal(fn(), expected), f"{case}: wrong result"
    _time_and_record(benchmark, record, fn, note, MERGE_GROUP, case, case == "clone + index_copy_ x2",
                     2 * B * L * D * batch.esize)
