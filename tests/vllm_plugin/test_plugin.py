"""The vLLM plugin (issue 15): greedy tokens of vLLM with DPVR-LF equal the package's HF DPVR-LF ``generate`` on
the same folder, prompts and images, for requests of different lengths batched together by vLLM's scheduler;
stock vLLM vs stock HF is the control. Runs in the vLLM environment only: ``make vllm-test``."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from vllm_folders import (
    ROUTE_LAYER,
    images,
    kv_capacity,
    make_dpvr_folder,
    make_next_stock_folder,
    make_onevision_stock_folder,
    make_qwen_stock_folder,
    make_stock_folder,
    prompts,
    qwen_prompts,
)

import dpvr_kernels
from dpvr_kernels.vllm import ARCHITECTURE, ARCHITECTURES

vllm = pytest.importorskip("vllm", reason="the vLLM environment: make vllm-env && make vllm-test")
if not os.environ.get("DPVR_VLLM_TESTS"):  # collected only by make vllm-test (tests/conftest.py)
    raise RuntimeError("run these tests with make vllm-test")

NEW_TOKENS = [6, 9, 4, 7, 5, 8]  # different lengths: requests finish at different steps, others join mid-decode
# Most tests build engines in eager mode (a compiled engine costs ~40 s of Inductor on 2 cores);
# test_compiled_plugin_matches_eager_and_hf runs vLLM's default compilation.
EAGER = {"enforce_eager": True}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    stock = make_stock_folder(root / "stock")
    return stock, make_dpvr_folder(stock, root / "dpvr")


def hf_greedy(folder, patched: bool, extra=(), base=None) -> tuple[list[list[int]], list[list[float]]]:
    """Per prompt (``base``, default ``prompts()``, and ``extra``), one at a time: greedy tokens and their
    log-probabilities from HF ``generate``."""
    proc = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    if patched:
        dpvr_kernels.patch(model)  # route layer and the trained side branch come from the checkpoint
    tokens, logprobs = [], []
    items = [*(base or prompts()), *extra]
    for (text, imgs), n in zip(items, NEW_TOKENS[: len(items)], strict=True):
        inputs = proc(images=imgs or None, text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        tokens.append(new)
        logprobs.append([torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new, strict=True)])
    return tokens, logprobs


def vllm_greedy(folder, extra=(), base=None, **engine) -> tuple[list[list[int]], list[list[float]]]:
    """All prompts submitted together; at most 3 running at once, so new prefills join running decodes."""
    from vllm import LLM, SamplingParams

    budget = engine.pop("max_num_batched_tokens_override", 512)  # a small budget splits prompts into chunks
    llm = LLM(model=str(folder), dtype="float32", max_model_len=256, max_num_seqs=3, max_num_batched_tokens=budget,
              limit_mm_per_prompt={"image": 2}, seed=0, **engine)
    reqs = [{"prompt": t, "multi_modal_data": {"image": imgs}} if imgs else {"prompt": t}
            for t, imgs in [*(base or prompts()), *extra]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, logprobs=0)
              for n in NEW_TOKENS[: len(reqs)]]
    outs = llm.generate(reqs, params)
    del llm
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                for o in outs]
    return tokens, logprobs


def greedy_error(got, want, what: str) -> float:
    """Asserts the greedy tokens are equal; returns the largest log-probability difference of those tokens."""
    (got_tokens, got_lp), (want_tokens, want_lp) = got, want
    assert got_tokens == want_tokens, f"{what}: tokens differ\n got  {got_tokens}\n want {want_tokens}"
    worst = max(abs(a - b) for g, w in zip(got_lp, want_lp, strict=True) for a, b in zip(g, w, strict=True))
    assert math.isfinite(worst), f"{what}: log-probabilities are not finite"
    return worst


@pytest.fixture(scope="module")
def stock_error(folders) -> float:
    """The control: stock vLLM on the stock folder gives stock HF's tokens; how far its log-probs are from HF's
    (vLLM's kernels sum in another order) is the yardstick for the plugin."""
    stock, _ = folders
    return greedy_error(vllm_greedy(stock, **EAGER), hf_greedy(stock, patched=False), "stock")


def test_stock_vllm_matches_stock_hf(stock_error):
    assert stock_error < 0.05, f"stock vLLM and stock HF differ by {stock_error:.2e} in log-probability"


def test_plugin_matches_hf_dpvr_generate(folders, stock_error):
    """DPVR-LF in vLLM == DPVR-LF in HF, token for token, for 5 requests of different lengths (0, 1 and 2
    images) batched by vLLM's scheduler, log-probs within twice the control's error; and DPVR-LF's answers are
    not stock's (the plugin really routes)."""
    stock, dpvr = folders
    assert json.loads((dpvr / "config.json").read_text())["dpvr"]["route_layer"] == ROUTE_LAYER
    want = hf_greedy(dpvr, patched=True)
    error = greedy_error(vllm_greedy(dpvr, **EAGER), want, "DPVR-LF")
    print(f"log-prob error vs HF: DPVR-LF {error:.2e}, stock (control) {stock_error:.2e}")
    assert error <= 2 * stock_error + 1e-5, f"DPVR-LF log-probs differ by {error:.2e} (control {stock_error:.2e})"
    stock_tokens, _ = hf_greedy(stock, patched=False)
    with_images = [i for i, (_, imgs) in enumerate(prompts()) if imgs]
    assert any(want[0][i] != stock_tokens[i] for i in with_images), "DPVR-LF gave stock's answers: nothing routed?"


def test_compiled_plugin_matches_eager_and_hf(folders, stock_error, monkeypatch):
    """vLLM's default compilation (no enforce_eager): the three layer ranges and the side branch are compiled modules
    (Dynamo + Inductor, attention as vLLM's op between the pieces), the routing between them eager, and all layers
    are a fifth one for the steps without vision tokens. The same tokens as the eager plugin and HF DPVR-LF, log-probs
    within the control's error."""
    from vllm.compilation.counter import compilation_counter

    _, dpvr = folders
    def compiles() -> int:
        return compilation_counter.num_aot_compiles + compilation_counter.num_aot_artifacts_loaded

    before = compiles()
    compiled = vllm_greedy(dpvr)
    assert compiles() - before == 5, ("the full, text-stream, side-branch, fusion and all-layer modules are compiled "
                                      "(or loaded)")
    want = hf_greedy(dpvr, patched=True)
    error = greedy_error(compiled, want, "DPVR-LF compiled")
    assert error <= 2 * stock_error + 1e-5, f"compiled log-probs differ by {error:.2e} (control {stock_error:.2e})"
    assert compiled[0] == vllm_greedy(dpvr, **EAGER)[0]


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_anyres_plugin_matches_hf_dpvr_generate(tmp_path, model_type):
    """LLaVA-NeXT (Llama) and LLaVA-OneVision (Qwen2 decoder): anyres tiles and image-newline rows, images of
    different sizes, 0, 1 and 2 images per request. The plugin's class for each gives HF DPVR-LF's greedy tokens;
    its vision tokens are vLLM's placeholders, the same tokens HF routes."""
    make = make_next_stock_folder if model_type == "llava_next" else make_onevision_stock_folder
    stock = make(tmp_path / "stock")
    dpvr = make_dpvr_folder(stock, tmp_path / "dpvr")
    assert json.loads((dpvr / "config.json").read_text())["architectures"] == [ARCHITECTURES[model_type]]
    want = hf_greedy(dpvr, patched=True)
    error = greedy_error(vllm_greedy(dpvr, **EAGER), want, f"DPVR-LF {model_type}")
    # The class's own control: stock vLLM against stock HF on the stock folder (towers and resizing differ).
    stock_hf = hf_greedy(stock, patched=False)
    control = greedy_error(vllm_greedy(stock, **EAGER), stock_hf, f"stock {model_type}")
    print(f"{model_type}: log-prob error vs HF: DPVR-LF {error:.2e}, stock (control) {control:.2e}")
    assert error <= 2 * control + 1e-5, f"{model_type} log-probs differ by {error:.2e} (control {control:.2e})"
    assert stock_hf[0] != want[0], "DPVR-LF gave stock's answers: nothing routed?"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_qwen2_5_vl_plugin_matches_hf_dpvr_generate(tmp_path, compiled):
    """Qwen2.5-VL: vLLM's M-RoPE positions ([3, N], compressed after each image, continued from the request's
    delta in decode) gathered per token into the side branch and the text stream; the deep layers' cache slots
    follow the tokens computed, not the (compressed) positions. HF DPVR-LF's greedy tokens, eager and compiled."""
    stock = make_qwen_stock_folder(tmp_path / "stock")
    dpvr = make_dpvr_folder(stock, tmp_path / "dpvr")
    assert json.loads((dpvr / "config.json").read_text())["architectures"] == [ARCHITECTURES["qwen2_5_vl"]]
    engine = {} if compiled else EAGER
    want = hf_greedy(dpvr, patched=True, base=qwen_prompts())
    error = greedy_error(vllm_greedy(dpvr, base=qwen_prompts(), **engine), want, "DPVR-LF Qwen2.5-VL")
    stock_hf = hf_greedy(stock, patched=False, base=qwen_prompts())
    control = greedy_error(vllm_greedy(stock, base=qwen_prompts(), **engine), stock_hf, "stock Qwen2.5-VL")
    print(f"qwen2_5_vl ({'compiled' if compiled else 'eager'}): log-prob error vs HF: DPVR-LF {error:.2e}, "
          f"stock (control) {control:.2e}")
    assert error <= 2 * control + 1e-5, f"Qwen2.5-VL log-probs differ by {error:.2e} (control {control:.2e})"
    assert stock_hf[0] != want[0], "DPVR-LF gave stock's answers: nothing routed?"


@pytest.mark.parametrize("budget", [12, 20])
def test_chunked_prefill_matches_unchunked_and_hf(folders, stock_error, budget, monkeypatch):
    """Chunked prefill (vLLM's default) with a token budget that splits prompts inside an image (16 vision tokens)
    and between two images: later chunks' vision tokens attend to the earlier chunks' through the side branch's
    own KV, the deep layers' text slots follow the text tokens computed so far. The same tokens as a prompt
    prefilled whole (no chunked prefill) and as HF DPVR-LF."""
    from dpvr_kernels.vllm import model as plugin_model

    layouts = plugin_model._DPVRForConditionalGeneration._stream_layouts
    split = []  # steps where a request's vision tokens continue from an earlier step (the engine is in-process)

    def spy(self, *args):
        text, vision = layouts(self, *args)
        split.extend(before for before in vision[2] if before)
        return text, vision

    monkeypatch.setattr(plugin_model._DPVRForConditionalGeneration, "_stream_layouts", spy)
    _, dpvr = folders
    want = hf_greedy(dpvr, patched=True)
    chunked = vllm_greedy(dpvr, max_num_batched_tokens_override=budget, **EAGER)
    assert split, "no image was split across steps: the budget did not chunk the prompts"
    error = greedy_error(chunked, want, f"DPVR-LF, chunks of {budget} tokens")
    assert error <= 2 * stock_error + 1e-5, f"chunked log-probs differ by {error:.2e} (control {stock_error:.2e})"
    # prompts prefilled whole, the side branch without KV (its uncached varlen attention)
    whole = vllm_greedy(dpvr, enable_chunked_prefill=False, enable_prefix_caching=False, **EAGER)
    assert whole[0] == chunked[0]


def test_all_text_steps_run_unrouted_on_the_builders_text_view(folders, monkeypatch):
    """Steps with no vision token (decode, prompt chunks past the images) are not routed: the deep layers' metadata
    builder already gave them the text stream's view (keys: each request's text tokens so far), and the forward
    runs all layers as one compiled range. Outside it, it reads nothing from the device, which CUDA graphs of a
    decode step need: the only op outside the layers is the residual's zeros (counted with a dispatch mode that
    pauses inside the ranges). One metadata build per step serves all KV groups of the full layers, and of the
    deep layers. Tokens equal HF DPVR-LF's."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from vllm.forward_context import get_forward_context

    from dpvr_kernels.vllm import model as plugin_model

    cls = plugin_model._DPVRForConditionalGeneration
    forward, route = cls.forward, cls._route_text_stream_and_fuse
    steps = []  # per forward: all-text?, routed?, text keys expected and given, ops outside the ranges

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    def paused(run, name, called):
        def call(*args):
            called.append(name)
            with _disable_current_modes():
                return run(*args)
        return call

    def spy_forward(self, *args, **kwargs):
        step, ctx = plugin_model._STEP[0], get_forward_context()
        if step is None or not ctx.attn_metadata:
            return forward(self, *args, **kwargs)
        record = {"all_text": step.all_text, "routed": False, "vision_before": sum(step.vision_before)}
        # One metadata build per step serves all KV groups of the full layers, and of the deep layers (each group
        # its own block table): several metadata objects, one scheduler metadata.
        full = [n for n in ctx.attn_metadata if n not in self._deep_names and n != self._side_name]
        for names in (full, self._deep_names):
            metas = [ctx.attn_metadata[n] for n in names]
            record.setdefault("builds", []).append((len({id(m) for m in metas}),
                                                    len({id(m.scheduler_metadata) for m in metas})))
        if step.all_text:
            seq_lens = ctx.attn_metadata[self._full_name].seq_lens.tolist()
            record["want"] = [s - v for s, v in zip(seq_lens, step.vision_before, strict=True)]
            record["got"] = ctx.attn_metadata[self._deep_names[-1]].seq_lens.tolist()
        steps.append(record)
        if not step.all_text:
            return forward(self, *args, **kwargs)
        ranges = [(name, getattr(self, name))
                  for name in ("_full_layers", "_text_stream", "_side_branch", "_fusion_layers", "_all_layers")]
        for name, module in ranges:  # an instance attribute shadows the submodule
            object.__setattr__(self, name, paused(module, name, record.setdefault("ranges", [])))
        try:
            with Ops() as ops:
                out = forward(self, *args, **kwargs)
        finally:
            for name, _ in ranges:
                self.__dict__.pop(name, None)
        record["ops"] = ops.seen
        return out

    def spy_route(self, *args, **kwargs):
        steps[-1]["routed"] = True
        return route(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy_forward)
    monkeypatch.setattr(cls, "_route_text_stream_and_fuse", spy_route)
    _, dpvr = folders
    got = vllm_greedy(dpvr, **EAGER)
    assert got[0] == hf_greedy(dpvr, patched=True)[0]
    text_steps = [s for s in steps if s["all_text"]]
    assert all(s["routed"] != s["all_text"] for s in steps), "exactly the steps with vision tokens are routed"
    assert any(s["vision_before"] for s in text_steps), "no decode step after an image"
    for s in steps:
        assert all(groups > 1 and builds == 1 for groups, builds in s["builds"]), s["builds"]
    for s in text_steps:
        assert s["got"] == s["want"], f"the deep layers' keys {s['got']} are not the text tokens so far {s['want']}"
        assert s["ops"] == ["aten.zeros_like"], f"ops outside the layer ranges in an all-text step: {s['ops']}"
        assert s["ranges"] == ["_all_layers"], f"an all-text step ran {s['ranges']}, not all layers as one range"


def test_full_groups_slots_equal_vllms_kernel(folders, monkeypatch):
    """On a CPU the plugin computes the full-layer KV groups' slots itself (one numpy split for all groups instead of
    vLLM's kernel call per group): every step's slots equal vLLM's kernel's, and the deep and side-branch groups,
    whose slots the plugin writes before their layers run, are skipped. Tokens equal HF DPVR-LF's."""
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    ours = MultiGroupBlockTable.compute_slot_mapping
    vllms = ours.__wrapped__
    steps = []

    def spy(self, num_reqs, query_start_loc, positions):
        ours(self, num_reqs, query_start_loc, positions)
        full = self.__dict__.get("_dpvr_full_groups")
        if full is None:
            return
        n = positions.shape[0]
        got = [t.slot_mapping.gpu.clone() for t in full]
        vllms(self, num_reqs, query_start_loc, positions)  # every group, into the same buffers
        want = [t.slot_mapping.gpu for t in full]
        steps.append((n, len(full), len(self.block_tables),
                      all(torch.equal(g, w) for g, w in zip(got, want, strict=True))))

    monkeypatch.setattr(MultiGroupBlockTable, "compute_slot_mapping", spy)
    _, dpvr = folders
    got = vllm_greedy(dpvr, **EAGER)
    assert got[0] == hf_greedy(dpvr, patched=True)[0]
    assert steps and any(n > 1 for n, *_ in steps), "no prompt step was seen"
    for n, full, groups, equal in steps:
        assert 1 <= full < groups, f"{full} of {groups} KV groups computed by the plugin: the streams' not skipped"
        assert equal, f"a step of {n} tokens: the plugin's full-group slots differ from vLLM's kernel's"


def conversation_turns() -> list[tuple[str, list]]:
    """Prompts that extend each other, as a chat's turns do (the same image, the conversation so far, a new
    question), a prompt that shares the first one's image but not its question, and a two-image chat. 16 vision
    tokens per image and block size 32: the first image spans a block boundary (a hit there continues the side
    branch from its cached KV), the text stream's blocks end off the full layers' boundaries (copy-on-write of a
    partial block); two images (32 vision tokens) keep the streams aligned (complete blocks only)."""
    one, two, three = images(3, seed=11)
    words = "what is in the picture describe it please the red house and a blue sun over a tree cat dog".split()
    reply = " ".join(words * 2)[: 140]  # about 30 tokens per turn
    first = "USER : describe the red house and the blue sun over a tree please what is in the picture <image> and"
    turns, text = [], first
    for question in ("a cat", "a dog", "a bird"):
        text = f"{text} {question} {reply} ASSISTANT :"
        turns.append((text, [one]))
    turns.append((f"{first} the blue sun ASSISTANT :", [one]))  # shares the first image only
    two_images = f"USER : <image> <image> {reply} ASSISTANT :"
    turns += [(two_images, [two, three]), (f"{two_images} a house USER : what else ASSISTANT :", [two, three])]
    return turns


def vllm_turns(folder, turns, **engine) -> tuple[tuple[list[list[int]], list[list[float]]], list[int]]:
    """Each turn submitted after the previous one finished (its blocks are cached by then): greedy tokens,
    log-probs, and the prompt tokens each turn found in the prefix cache."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", max_model_len=256, block_size=32, limit_mm_per_prompt={"image": 2},
              seed=0, **engine)
    tokens, logprobs, cached = [], [], []
    for (text, imgs), n in zip(turns, NEW_TOKENS, strict=False):
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, logprobs=0)
        (out,) = llm.generate([{"prompt": text, "multi_modal_data": {"image": imgs}}], params)
        tokens.append(list(out.outputs[0].token_ids))
        logprobs.append([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens[-1], strict=True)])
        cached.append(out.num_cached_tokens or 0)
    del llm
    return (tokens, logprobs), cached


@pytest.fixture(scope="module")
def turns_control(folders) -> float:
    """The control on the conversation turns: stock vLLM (caching off) against stock HF."""
    stock, _ = folders
    turns = conversation_turns()
    got, _ = vllm_turns(stock, turns, enforce_eager=True, enable_prefix_caching=False)
    return greedy_error(got, hf_greedy(stock, patched=False, base=turns), "stock, conversation turns")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_prefix_caching_hits_and_keeps_hf_answers(folders, turns_control, compiled, monkeypatch):
    """Prefix caching (vLLM's default): a chat's later turns start from the cached blocks of the earlier ones, in
    the full layers, the text-only deep layers and the side branch; a hit may end inside an image or inside a
    compacted block (copy-on-write). Every turn's tokens equal HF DPVR-LF's, and its log-probs an engine without
    caching's."""
    from dpvr_kernels.vllm import kv_cache

    _, dpvr = folders
    turns = conversation_turns()
    hits = []  # (stream manager, that stream's tokens the hit covers) for each stream lookup that found blocks
    finder = kv_cache._StreamManager.find_longest_cache_hit.__func__

    def spy(cls, *args, **kwargs):
        blocks, length = finder(cls, *args, **kwargs)
        if blocks[0]:
            hits.append((cls.__name__, cls._count(kv_cache._LOOKUP[0].request_id, length)))
        return blocks, length

    monkeypatch.setattr(kv_cache._StreamManager, "find_longest_cache_hit", classmethod(spy))
    engine = {} if compiled else {"enforce_eager": True}
    got, cached = vllm_turns(dpvr, turns, **engine)
    assert cached == [0, 64, 96, 32, 0, 64], f"the turns found {cached} cached tokens"
    block = 32
    streams = {name for name, _ in hits}
    assert streams == {"TextOnlyAttentionManager", "VisionOnlyAttentionManager"}, hits
    assert {name for name, n in hits if n % block} == streams, f"no partial (copy-on-write) hit in each: {hits}"
    assert ("TextOnlyAttentionManager", 32) in hits, f"the two-image turn's aligned text hit is missing: {hits}"
    want = hf_greedy(dpvr, patched=True, base=turns)
    error = greedy_error(got, want, "DPVR-LF with prefix caching")
    print(f"conversation turns, log-prob error vs HF: DPVR-LF {error:.2e}, stock (control) {turns_control:.2e}")
    assert error <= 2 * turns_control + 1e-5, f"log-probs differ by {error:.2e} (control {turns_control:.2e})"
    if not compiled:
        uncached, none = vllm_turns(dpvr, turns, enable_prefix_caching=False, **engine)
        assert not any(none)
        assert greedy_error(got, uncached, "cached vs uncached") <= 1e-5


def test_qwen2_5_vl_prefix_caching_matches_uncached_and_hf(tmp_path):
    """Qwen2.5-VL with prefix caching: M-RoPE positions of a request that starts from cached blocks (vLLM's, from
    the request's start) and its cached vision tokens counted from its placeholders. HF DPVR-LF's tokens, and the
    log-probs of an engine without caching."""
    stock = make_qwen_stock_folder(tmp_path / "stock")
    dpvr = make_dpvr_folder(stock, tmp_path / "dpvr")
    turns = [(text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>"), imgs)
             for text, imgs in conversation_turns()]
    got, cached = vllm_turns(dpvr, turns, **EAGER)
    assert all(cached[i] >= 32 for i in (1, 2, 5)), f"the later turns found {cached} cached tokens"
    uncached, _ = vllm_turns(dpvr, turns, enable_prefix_caching=False, **EAGER)
    assert greedy_error(got, uncached, "Qwen2.5-VL cached vs uncached") <= 1e-5
    want = hf_greedy(dpvr, patched=True, base=turns)
    assert got[0] == want[0]


@pytest.mark.parametrize("route_layer", [0, 1])
def test_plugin_matches_hf_at_low_route_layers(tmp_path, route_layer, stock_error):
    """Found by review: with many more deep layers than full ones vLLM splits the deep layers into several KV
    groups of equal size (route 1 of 6: full {0, 5}, text-only {1, 3} and {2, 4}), each with its own block table;
    and at route layer 0 layer 0 itself is text-only. Also a request with no text token at all."""
    stock = make_stock_folder(tmp_path / "stock")
    dpvr = make_dpvr_folder(stock, tmp_path / "dpvr", route_layer=route_layer)
    image_only = ("<image>", images(1, seed=9))
    want = hf_greedy(dpvr, patched=True, extra=[image_only])
    error = greedy_error(vllm_greedy(dpvr, extra=[image_only], block_size=32, **EAGER), want,
                         f"DPVR-LF, route layer {route_layer}")
    assert error <= 2 * stock_error + 1e-5


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 needs 2 CPU cores, one per rank")
def test_plugin_tensor_parallel_2_matches_hf_dpvr_generate(folders, stock_error, monkeypatch):
    """Under tensor parallelism (2 CPU ranks, gloo) the side branch and the deep layers run on each rank's
    heads; the answers are the same."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (vLLM cannot bind on one NUMA node)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # The engine core in its own process, as users run it: its scheduler meets the text-only KV spec only when the
    # workers' specs are unpickled there (which imports dpvr_kernels.vllm.kv_cache and registers it).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING
    _, dpvr = folders
    error = greedy_error(vllm_greedy(dpvr, tensor_parallel_size=2, **EAGER),
                         hf_greedy(dpvr, patched=True), "DPVR-LF, TP 2")
    assert error <= 2 * stock_error + 1e-5, f"DPVR-LF TP 2 log-probs differ by {error:.2e} (control {stock_error:.2e})"


def test_a_generated_image_token_id_is_text(folders):
    """A decode step whose token happens to be the image token id is text to vLLM (embedded from the vocabulary,
    not a placeholder); the plugin routes by vLLM's placeholder mask, so it keeps serving instead of failing."""
    from vllm import LLM, SamplingParams

    _, dpvr = folders
    image_id = LlavaForConditionalGeneration.config_class.from_pretrained(dpvr).image_token_index
    llm = LLM(model=str(dpvr), dtype="float32", max_model_len=256, limit_mm_per_prompt={"image": 1}, seed=0,
              **EAGER)
    text, imgs = prompts()[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, ignore_eos=True, logit_bias={image_id: 100})
    (out,) = llm.generate([{"prompt": text, "multi_modal_data": {"image": imgs}}], params)
    del llm
    assert list(out.outputs[0].token_ids) == [image_id] * 4


def test_deep_layers_hold_blocks_for_text_tokens_only_so_more_requests_fit(tmp_path, monkeypatch):
    """Phase 2: the deep layers are their own KV cache group, sized per request for its text tokens; in the same KV
    memory vLLM then runs more requests at once than stock (each request: 256 vision + 10 text tokens)."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")  # it would override kv_cache_memory_bytes
    stock = make_stock_folder(tmp_path / "stock", image_size=224)
    dpvr = make_dpvr_folder(stock, tmp_path / "dpvr")
    reqs = [{"prompt": "USER : <image> what is in the picture ASSISTANT :", "multi_modal_data": {"image": im}}
            for im in images(16)]
    memory = 6 * 2**20
    got = {name: kv_capacity(folder, reqs, kv_cache_memory_bytes=memory) for name, folder in
           (("stock", stock), ("dpvr", dpvr))}
    assert got["stock"]["groups"] == [("FullAttentionSpec", 6)]
    # layers 0-2 and 5 in two full groups, the deep layers 3-4 in the text-only group (2 layers per group)
    assert got["dpvr"]["groups"] == [("FullAttentionSpec", 2), ("FullAttentionSpec", 2), ("TextOnlyAttentionSpec", 2)]
    tokens = 256 + 10 + 1  # the prefill step's slots: prompt + the first new token
    full, text = math.ceil(tokens / 32), math.ceil((tokens - 256) / 32)
    assert got["stock"]["blocks_per_request"] == [[full]]
    assert got["dpvr"]["blocks_per_request"] == [[full], [full], [text]]
    # the same bytes: 6-layer blocks for stock, 2-layer blocks for DPVR-LF
    assert got["dpvr"]["num_blocks"] == 3 * got["stock"]["num_blocks"]
    per_request = {"stock": 6 * full, "dpvr": 2 * (2 * full + text)}  # layer-blocks
    for name, result in got.items():
        assert result["peak_running"] == min(len(reqs), 6 * got["stock"]["num_blocks"] // per_request[name]), name
    assert got["dpvr"]["peak_running"] > got["stock"]["peak_running"]
    # At vLLM's defaults (chunked prefill, prefix caching) the side branch keeps its vision tokens' KV in a group
    # of its own (one layer, so vLLM makes every group one layer wide): 4 full layers x 9 blocks + 2 text-only x 1
    # + the side branch's 8 blocks.
    defaults = kv_capacity(dpvr, reqs, kv_cache_memory_bytes=memory, defaults=True)
    assert defaults["groups"] == ([("FullAttentionSpec", 1)] * 4 + [("TextOnlyAttentionSpec", 1)] * 2
                                  + [("VisionOnlyAttentionSpec", 1)])
    assert defaults["blocks_per_request"] == [[full]] * 4 + [[text]] * 2 + [[math.ceil(256 / 32)]]
    assert got["stock"]["peak_running"] < defaults["peak_running"] <= got["dpvr"]["peak_running"]


def _copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_plugin_refuses_an_incomplete_side_branch(folders, tmp_path):
    """vLLM does not report a linear layer's missing weights; without this check the side branch would be served
    with an uninitialised down_proj."""
    from safetensors.torch import load_file, save_file

    dpvr = _copy_folder(folders[1], tmp_path / "dpvr")
    state = load_file(dpvr / "model.safetensors")
    (gone,) = [k for k in state if k.endswith("dpvr_side_branch.mlp.down_proj.weight")]
    del state[gone]
    save_file(state, dpvr / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no side-branch weights for \['mlp.down_proj.weight'\]"):
        vllm_greedy(dpvr, **EAGER)


def test_plugin_refuses_a_route_layer_out_of_range(folders, tmp_path):
    dpvr = _copy_folder(folders[1], tmp_path / "dpvr")
    config = json.loads((dpvr / "config.json").read_text())
    config["dpvr"]["route_layer"] = 5
    (dpvr / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"dpvr=.*not valid for its 6-layer decoder.*route_layer=5.*re-save"):
        vllm_greedy(dpvr, **EAGER)


def test_plugin_loads_a_flat_clip_tower(tmp_path, stock_error):
    """transformers 5 saves a CLIP tower built from a config flattened (vision_tower.embeddings...), unlike the
    llava-hf checkpoints; the plugin loads both layouts."""
    from model_folder import make_llava_folder
    from safetensors import safe_open

    stock = make_llava_folder(tmp_path / "stock", image_size=56, layers=6, seed=3, hidden=128, kv_heads=2,
                              max_positions=2048)
    dpvr = make_dpvr_folder(stock, tmp_path / "dpvr")
    with safe_open(dpvr / "model.safetensors", framework="pt") as f:
        assert any(".vision_tower.embeddings." in f".{k}" for k in f.keys()), "the folder is not flat"
    error = greedy_error(vllm_greedy(dpvr, **EAGER), hf_greedy(dpvr, patched=True), "flat CLIP")
    assert error <= 2 * stock_error + 1e-5


def _engine_config(**changes):
    """A stand-in VllmConfig at vLLM's defaults, with ``changes`` (dotted names) applied."""
    from types import SimpleNamespace as NS

    cfg = NS(model_config=NS(enforce_eager=False), cache_config=NS(enable_prefix_caching=True),
             scheduler_config=NS(enable_chunked_prefill=True, long_prefill_token_threshold=0,
                                  disable_hybrid_kv_cache_manager=False), speculative_config=None,
             parallel_config=NS(pipeline_parallel_size=1), lora_config=None, kv_transfer_config=None)
    for name, value in changes.items():
        *path, last = name.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return cfg


@pytest.mark.parametrize("change, named", [
    ({"lora_config": object()}, "no LoRA adapters"),
    ({"kv_transfer_config": object()}, "no KV connector"),
    ({"speculative_config": object()}, "no speculative decoding"),
    ({"parallel_config.pipeline_parallel_size": 2}, "pipeline_parallel_size=1"),
    ({"scheduler_config.disable_hybrid_kv_cache_manager": True}, "the hybrid KV cache manager"),
])
def test_plugin_refuses_settings_that_split_or_share_prefills(change, named):
    """Found by review: each of these let stock vLLM serve but broke the plugin (a prompt prefilled in pieces,
    LoRA's per-token metadata, KV from elsewhere). The check runs when the model is built."""
    from dpvr_kernels.vllm.model import _refuse_engine_settings

    _refuse_engine_settings(_engine_config())  # vLLM's defaults pass
    with pytest.raises(ValueError, match=f"{ARCHITECTURE}.*needs.*{re.escape(named)}"):
        _refuse_engine_settings(_engine_config(**change))


def test_plugin_serves_text_only_when_multimodal_inputs_are_off(folders):
    """limit_mm_per_prompt={"image": 0}: vLLM feeds token ids and skips embed_input_ids; every token is text."""
    from vllm import LLM, SamplingParams

    stock, dpvr = folders
    llm = LLM(model=str(dpvr), dtype="float32", max_model_len=256, limit_mm_per_prompt={"image": 0}, seed=0,
              **EAGER)
    text = prompts()[2][0]
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5, ignore_eos=True)
    (out,) = llm.generate([text], params)
    del llm
    proc = AutoProcessor.from_pretrained(dpvr)
    model = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(dpvr, dtype=torch.float32).eval())
    inputs = proc(text=text, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert list(out.outputs[0].token_ids) == ids[0, inputs["input_ids"].shape[1] :].tolist()


def test_plugin_refuses_an_untested_attention_backend(folders, monkeypatch):
    """The deep layers' metadata rewrite is tested on CPU_ATTN only: any other backend stops the engine at start
    (emulated by taking CPU_ATTN off the list; the engine runs in this process, conftest.py), unless it is named in
    DPVR_VLLM_TRY_BACKEND."""
    from dpvr_kernels.vllm import model as plugin_model

    monkeypatch.setattr(plugin_model, "SUPPORTED_ATTENTION_BACKENDS", ("FLASH_ATTN",))
    _, dpvr = folders
    with pytest.raises(Exception, match=r"tested for the \('FLASH_ATTN',\) attention backend.*uses CPU_ATTN"):
        vllm_greedy(dpvr, **EAGER)
    # Named in DPVR_VLLM_TRY_BACKEND (the GPU kit's vLLM stage), the backend is served, with a warning.
    monkeypatch.setenv(plugin_model.TRY_BACKEND_ENV, "CPU_ATTN")
    assert vllm_greedy(dpvr, **EAGER)[0] == hf_greedy(dpvr, patched=True)[0]


def test_model_module_refuses_other_vllm_versions(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.delitem(sys.modules, "dpvr_kernels.vllm.model", raising=False)
    with pytest.raises(ImportError, match=r"tested against vLLM 0\.32\.0, but vLLM 0\.33\.0 is installed"):
        importlib.import_module("dpvr_kernels.vllm.model")


def test_entry_point_registers_the_dpvr_class():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.value == "dpvr_kernels.vllm:register"]
    ep.load()()
    assert set(ARCHITECTURES.values()) <= set(ModelRegistry.get_supported_archs())


def test_openai_server_serves_the_dpvr_checkpoint(folders, tmp_path):
    """The README's serving command on loopback: a chat request with an image gets HF DPVR-LF's greedy answer.
    (vllm-cpu 0.32.0's ``vllm`` console script looks up a distribution named "vllm" and fails; the module entry
    point is the same server.)"""
    import base64
    import io
    import socket
    import subprocess
    import time
    import urllib.request

    _, dpvr = folders
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(dpvr), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--limit-mm-per-prompt",
           '{"image": 1}', "--enforce-eager"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            assert time.time() < deadline, "server not healthy within 180 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        (img,) = prompts()[0][1]
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": str(dpvr), "max_tokens": 6, "min_tokens": 6, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what is in the picture"}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    proc = AutoProcessor.from_pretrained(dpvr)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    model = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(dpvr, dtype=torch.float32).eval())
    inputs = proc(images=[img], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    want = proc.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply["usage"]["completion_tokens"] == 6
    assert reply["choices"][0]["message"]["content"].split() == want.split()
