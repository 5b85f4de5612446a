"""vLLM serving throughput, stock vs the DPVR-LF plugin (issue 15), in vLLM's environment: ``make vllm-bench``.

Eight requests (one 576-token image each, prompts of different lengths) submitted together to one engine with
``max_num_seqs=8``; the same random LLaVA-1.5-shaped model (scaled to run on a CPU) served stock and as a DPVR-LF
checkpoint, both with the plugin's engine flags (``REQUIRED_ENGINE_ARGS``) so only the model differs. Two
workloads: prefill throughput (1 new token: the ideal is the cost model's prefill FLOP ratio) and generation
(32 new tokens each: output tokens/s). Not collected by ``make test`` (tests and benchmarks conftest).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
from timing import QUICK, measure, median_s

HERE = os.path.dirname(__file__)
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "vllm_plugin")]
from vllm_folders import BENCH_SIZE, bench_requests, make_dpvr_folder, make_stock_folder  # noqa: E402

from dpvr_kernels import cost_model  # noqa: E402
from dpvr_kernels.vllm import REQUIRED_ENGINE_ARGS  # noqa: E402

pytest.importorskip("vllm", reason="the vLLM environment: make vllm-env && make vllm-bench")

CONCURRENT = 8
NEW_TOKENS = 32
SIZE = dict(hidden=128, heads=2, kv_heads=2, layers=4, image_size=56) if QUICK else BENCH_SIZE


def requests() -> list[dict]:
    return bench_requests(CONCURRENT)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_bench_models")
    stock = make_stock_folder(root / "stock", **SIZE)
    return {"stock": stock, "dpvr": make_dpvr_folder(stock, root / "dpvr", route_layer=None)}


@pytest.fixture(scope="module", params=["stock", "dpvr"])
def engine(request, folders):
    from vllm import LLM

    llm = LLM(model=str(folders[request.param]), dtype="float32", max_model_len=1024, max_num_seqs=CONCURRENT,
              max_num_batched_tokens=CONCURRENT * 1024, limit_mm_per_prompt={"image": 1}, seed=0,
              **REQUIRED_ENGINE_ARGS)
    yield request.param, llm
    del llm
    gc.collect()


def ideal_prefill(folders) -> float:
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(folders["dpvr"])
    tok = AutoProcessor.from_pretrained(folders["dpvr"]).tokenizer
    image_tokens = (SIZE["image_size"] // 14) ** 2
    text = sum(len(tok(r["prompt"])["input_ids"]) - 1 for r in requests()) // CONCURRENT  # minus <image>
    return cost_model(config, image_tokens=image_tokens, text_tokens=text, batch=CONCURRENT,
                      route_layer=config.dpvr["route_layer"]).ideal_prefill_speedup


@pytest.mark.parametrize("new_tokens", [1, NEW_TOKENS], ids=["prefill", "generate"])
def test_vllm_serving_throughput(benchmark, record, engine, folders, new_tokens):
    from vllm import SamplingParams

    which, llm = engine
    reqs = requests()
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate(reqs, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    measure(benchmark, lambda: llm.generate(reqs, params, use_tqdm=False), rounds=7, warmup=1)
    median = median_s(benchmark)
    rate = f"{CONCURRENT * new_tokens / median:.1f} output tok/s" if median else ""
    ideal = ideal_prefill(folders) if which == "dpvr" and new_tokens == 1 else None
    record(benchmark, group=f"vLLM {CONCURRENT} concurrent requests, {new_tokens} new token(s) each",
           name=f"{which} vLLM" + (" + DPVR-LF plugin" if which == "dpvr" else ""), baseline=which == "stock",
           ideal=ideal, note=rate)
