"""KV memory in vLLM, stock vs the DPVR-LF plugin (issue 15, phase 2): how many requests run at once.

The vLLM benchmarks' model (tests/vllm_plugin/vllm_folders.py ``BENCH_SIZE``: 12 layers, route layer 7, 576 vision
tokens per image) served stock (vLLM's defaults) and as a DPVR-LF checkpoint (without chunked prefill and prefix caching, and at
vLLM's defaults) from the same KV memory; 32 requests submitted at once, 4 new tokens each, block size 32. Reports the KV groups, the blocks in the pool, each group's blocks per request and
the most requests running at once, with the cost model's ideal (stock KV bytes / DPVR-LF KV bytes per request).
Run in the vLLM environment (``make vllm-bench`` runs it after the throughput benchmark)::

    .venv-vllm/bin/python scripts/vllm_kv_capacity.py [--out benchmarks/results/vllm_kv_cpu] [--mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler is read in this process
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "vllm_plugin")]

from vllm_folders import BENCH_SIZE, bench_requests, kv_capacity, make_dpvr_folder, make_stock_folder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_kv_cpu"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--mib", type=int, default=256, help="KV cache memory of each engine, MiB")
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoProcessor

    from dpvr_kernels import cost_model

    with tempfile.TemporaryDirectory() as tmp:
        stock = make_stock_folder(Path(tmp) / "stock", **BENCH_SIZE)
        dpvr = make_dpvr_folder(stock, Path(tmp) / "dpvr", route_layer=None)
        reqs = bench_requests(args.requests)
        results = {name: kv_capacity(folder, reqs, kv_cache_memory_bytes=args.mib * 2**20, defaults=defaults)
                   for name, folder, defaults in (("stock", stock, True), ("dpvr", dpvr, False),
                                                  ("dpvr, vLLM defaults", dpvr, True))}
        config = AutoConfig.from_pretrained(dpvr)
        tok = AutoProcessor.from_pretrained(dpvr).tokenizer
        text = round(sum(len(tok(r["prompt"])["input_ids"]) - 1 for r in reqs) / len(reqs))
        vision = (BENCH_SIZE["image_size"] // 14) ** 2
        cost = cost_model(config, image_tokens=vision, text_tokens=text, route_layer=config.dpvr["route_layer"],
                          dtype_bytes=4)
    ideal = cost.kv_bytes_stock / cost.kv_bytes_dpvr
    peak = {name: r["peak_running"] for name, r in results.items()}
    lines = [
        f"KV memory {args.mib} MiB per engine, {args.requests} requests submitted at once ({vision} vision + ~{text} "
        f"text tokens, 4 new tokens each), block size 32, fp32; model {BENCH_SIZE}, route layer "
        f"{config.dpvr['route_layer']}. vLLM {__import__('vllm').__version__} CPU build.",
        "",
        "| engine | KV groups (spec, layers) | blocks in pool | blocks per request, per group | requests at once |",
        "|---|---|---:|---|---:|",
    ]
    for name, r in results.items():
        groups = ", ".join(f"{spec} x{n}" for spec, n in r["groups"])
        lines.append(f"| {name} | {groups} | {r['num_blocks']} | {r['blocks_per_request']} | {r['peak_running']} |")
    lines += ["", f"Requests at once, DPVR-LF / stock: {peak['dpvr'] / peak['stock']:.2f}x; ideal (cost model, KV bytes "
              f"per request stock / DPVR-LF, without block rounding): {ideal:.2f}x. At vLLM's defaults (chunked "
              f"prefill, prefix caching) the side branch keeps KV too, in blocks for its vision tokens only: "
              f"{peak['dpvr, vLLM defaults'] / peak['stock']:.2f}x."]
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    Path(args.out + ".md").write_text(text_out)
    Path(args.out + ".json").write_text(json.dumps({"mib": args.mib, "results": results, "ideal": ideal,
                                                    "ratio": peak["dpvr"] / peak["stock"]}, indent=1))
    return 0 if peak["dpvr"] > peak["stock"] else 1


if __name__ == "__main__":
    sys.exit(main())
