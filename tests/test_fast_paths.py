"""Fast paths users turn on: the static cache under DPVR-LF, decode steps that trace whole, compiled generation."""

from __future__ import annotations

import pytest
import torch
from tiny import make_batch, tiny_llava
from transformers import CompileConfig, StaticCache

import dpvr_kernels
from dpvr_kernels.models.backbone import CACHE_KW
from dpvr_kernels.models.cache import DPVRStaticCache

PROMPTS = [["T", "I", "T", "T"], ["T", "T", "I", "T", "T", "T", "T"], ["T", "T", "T"]]
NEW = 8


def _generate(model, ids, mask, pv, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=NEW, **kw)


@pytest.mark.parametrize("route_layer", [0, 2, 4])
def test_static_cache_greedy_equals_dynamic(route_layer):
    model = dpvr_kernels.patch(tiny_llava(), route_layer=route_layer)
    ids, mask, pv = make_batch(PROMPTS, seed=route_layer)
    dynamic = _generate(model, ids, mask, pv, do_sample=False)
    static = _generate(model, ids, mask, pv, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_static_cache_sampling_equals_dynamic():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=3)
    ids, mask, pv = make_batch(PROMPTS, seed=11)
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(7)
    dynamic = _generate(model, ids, mask, pv, **kw)
    torch.manual_seed(7)
    static = _generate(model, ids, mask, pv, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)


def test_static_cache_is_text_only_in_the_deep_layers_by_the_cost_model():
    # One prompt of 8 image + 6 text tokens: the deep layers hold 6 + NEW - 1 slots, the others 14 + NEW - 1
    # (as stock sizes its static cache: the last new token is never fed back).
    ids, mask, pv = make_batch([["T", "T", "I", "T", "T", "T", "I", "T"]])
    stock = tiny_llava()
    out = _generate(stock, ids, mask, pv, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    stock_bytes = dpvr_kernels.kv_cache_bytes(getattr(out, CACHE_KW))
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    out = _generate(model, ids, mask, pv, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    cache = getattr(out, CACHE_KW)
    assert isinstance(cache, DPVRStaticCache)
    assert [layer.max_cache_len for layer in cache.layers] == [13 + NEW] * 2 + [5 + NEW] * 3 + [13 + NEW]
    report = dpvr_kernels.cost_model(model.config, image_tokens=8, text_tokens=5 + NEW, route_layer=2, dtype_bytes=4)
    assert dpvr_kernels.kv_cache_bytes(cache) == report.kv_bytes_dpvr
    assert stock_bytes == report.kv_bytes_stock
    assert dpvr_kernels.kv_cache_bytes(cache) < stock_bytes


def test_user_static_cache_is_used_correctly():
    # A transformers.StaticCache made by the user is adopted (every layer at stock capacity): same tokens.
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch(PROMPTS, seed=5)
    user_cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + NEW)
    out = _generate(model, ids, mask, pv, do_sample=False, **{CACHE_KW: user_cache})
    assert torch.equal(out, _generate(model, ids, mask, pv, do_sample=False))
    assert isinstance(user_cache, DPVRStaticCache)  # the same object, now with the DPVR-LF bookkeeping


def _prefilled(cache_kind: str):
    model = dpvr_kernels.patch(tiny_llava(layers=4), route_layer=1)
    ids, mask, pv = make_batch([["T", "I", "T"], ["T", "T", "I", "T", "T"]])
    cache = None
    if cache_kind == "static":
        cache = DPVRStaticCache(model.config, max_cache_len=ids.shape[1] + 4, text_cache_len=4 + 4, route_layer=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True, **{CACHE_KW: cache})
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return model, getattr(out, CACHE_KW), nxt, torch.cat([mask, torch.ones_like(nxt)], 1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_decode_step_traces_whole(cache_kind):
    model, cache, nxt, mask = _prefilled(cache_kind)
    pos = mask.sum(-1, keepdim=True) - 1

    def step(nxt, mask, pos):
        return model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **{CACHE_KW: cache}).logits

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(step)(nxt, mask, pos)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_fullgraph_compiled_decode_step_matches_eager(cache_kind):
    model, cache, nxt, mask = _prefilled(cache_kind)
    _, cache2, _, _ = _prefilled(cache_kind)  # the same prefill, for the compiled run
    pos = mask.sum(-1, keepdim=True) - 1

    def step(cache, nxt, mask, pos):
        return model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **{CACHE_KW: cache}).logits

    torch._dynamo.reset()
    with torch.no_grad():
        eager = step(cache, nxt, mask, pos)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(cache2, nxt, mask, pos)
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() < 1e-5


def test_hf_compiled_generation_with_static_cache():
    # transformers' compiled decode (compile_config + static cache; CUDA graphs on a GPU): fullgraph, Inductor.
    model = dpvr_kernels.patch(tiny_llava(layers=4), route_layer=1)
    ids, mask, pv = make_batch(PROMPTS, seed=3)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _generate(model, ids, mask, pv, do_sample=False)
    compiled = _generate(model, ids, mask, pv, do_sample=False, cache_implementation="static", compile_config=config)
    assert torch.equal(eager, compiled)
    # One graph for every decode step: the 2-D mask is padded to the cache's capacity, so shapes never change
    # (on a GPU: one CUDA graph, not one per length).
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_prefill_matches_eager_without_recompiling_per_length():
    # The plan's one host sync is a graph break by design; after it the segment lengths are symbolic ints, so
    # new text/image lengths reuse the graphs. (Like stock, a new number of images recompiles, and dynamo
    # specializes a segment of 0 or 1 tokens; every sample here keeps >= 2 of each.)
    from torch._dynamo.utils import counters

    model = dpvr_kernels.patch(tiny_llava(layers=4), route_layer=1)

    def prefill(ids, mask, pv):
        return model(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=False).logits

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(prefill, dynamic=True, backend="aot_eager")
    layouts = [
        [["T"] * 5 + ["I"] + ["T"] * 3, ["T"] * 4 + ["I"]],
        [["T"] * 20 + ["I"] + ["T"] * 2, ["T"] * 3 + ["I"] + ["T"] * 30],
    ]
    graphs = []
    for seed, layout in enumerate(layouts):
        ids, mask, pv = make_batch(layout, seed=seed)
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        with torch.no_grad():
            eager, fast = prefill(ids, mask, pv), compiled(ids, mask, pv)
        assert ((fast - eager).abs().max() / eager.abs().max()).item() < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs


def test_compiled_generation_set_up_through_generation_config():
    """The transformers docs' idiom: model.generation_config.cache_implementation = "static" and a compile_config
    on it, then a plain generate(). Eager's tokens, one graph, and the model's generation_config unchanged."""
    from torch._dynamo.utils import counters

    model = dpvr_kernels.patch(tiny_llava(layers=4), route_layer=1)
    ids, mask, pv = make_batch(PROMPTS, seed=4)
    eager = _generate(model, ids, mask, pv, do_sample=False)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
    torch._dynamo.reset()
    counters.clear()
    compiled = _generate(model, ids, mask, pv, do_sample=False)
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1
    assert model.generation_config.cache_implementation == "static"


def test_compiled_generation_reuses_the_cache_without_recompiling():
    """As stock: a later compiled static-cache call with fewer new tokens, or a shorter prompt, reuses the
    previous (large enough) cache, so the compiled decode step is not re-made (on a GPU: its CUDA graphs stay);
    a longer one allocates a new cache once. Every call gives eager's tokens."""
    from torch._dynamo.utils import counters

    model = dpvr_kernels.patch(tiny_llava(layers=4), route_layer=1)
    config = CompileConfig(fullgraph=True, mode="default", dynamic=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    long_prompt = make_batch(PROMPTS, seed=6)
    short_prompt = make_batch([["T", "I", "T"], ["T", "T", "I", "T", "T"], ["T", "T"]], seed=7)
    torch._dynamo.reset()
    counters.clear()
    caches = []
    for (ids, mask, pv), new in [(long_prompt, NEW), (long_prompt, NEW - 3), (short_prompt, NEW)]:
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=new, do_sample=False,
                             cache_implementation="static", compile_config=config, return_dict_in_generate=True)
        caches.append(getattr(out, CACHE_KW))
        with torch.no_grad():
            eager = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=new,
                                   do_sample=False)
        assert torch.equal(out.sequences, eager)
    assert caches[0] is caches[1] is caches[2]
    assert counters["stats"]["unique_graphs"] == 1  # no recompile for the shorter call or the shorter prompt
    ids, mask, pv = long_prompt
    longer = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=2 * NEW,
                            do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    assert getattr(longer, CACHE_KW) is not caches[0]
