"""Largest batch that fits: stock vs DPVR-LF, a static cache for PROMPT + NEW tokens, same weights.

For each variant a batch size is tried by allocating the static cache ``generate(cache_implementation=
"static")`` would make (every layer for prompt + new tokens; under DPVR-LF the deep layers hold the text only),
running the prefill and one decode step into it. On CUDA a batch fits when that does not raise an
out-of-memory error (the real limit, activations included). On CPU (the kit's dry run) there is no such limit:
a batch fits when weights + the live cache stay within ``--budget-gib``, which only checks the plumbing.
The search doubles the batch until it fails, then bisects. Writes JSON (``--out``) and prints a line per variant.

    python scripts/capacity.py --out capacity.json [--prompt-text 64 --new 256 --max-batch 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import dpvr_kernels  # noqa: E402
from dpvr_kernels.workloads import decode, prefill, set_dpvr, static_cache, synthetic_batch  # noqa: E402


def _fits(model, config, batch_size: int, text: int, new: int, device, dtype, budget: int | None) -> bool:
    batch = synthetic_batch(config, batch_size, text, device=device, dtype=dtype)
    cache = None
    try:
        cache = static_cache(model, batch, new)
        if budget is not None and dpvr_kernels.kv_cache_bytes(cache) + _weight_bytes(model) > budget:
            return False
        with torch.no_grad():
            tokens, cache = prefill(model, batch, cache=cache)
            decode(model, batch, tokens, cache, 1)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del cache, batch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def largest_batch(fits, max_batch: int) -> int:
    """The largest ``b <= max_batch`` with ``fits(b)`` (``fits`` monotone), 0 if none: doubling, then bisection."""
    lo, hi = 0, 1
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main(argv: list[str] | None = None) -> int:
    from shapes import CONFIG, DEVICE, DTYPE, DTYPE_NAME

    from dpvr_kernels.config import default_route_layer
    from dpvr_kernels.vision_tokens import tokens_per_image
    from dpvr_kernels.workloads import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--prompt-text", type=int, default=64, help="text tokens per prompt (plus one image)")
    ap.add_argument("--new", type=int, default=256, help="new tokens the static cache has room for")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--budget-gib", type=float, default=2.0, help="CPU only: weights + cache budget")
    args = ap.parse_args(argv)
    budget = None if DEVICE.type == "cuda" else int(args.budget_gib * 2**30)
    model = build_model(CONFIG, dtype=DTYPE, device=DEVICE, attn="sdpa")
    result = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "dtype": DTYPE_NAME,
              "prompt_tokens": tokens_per_image(CONFIG) + args.prompt_text, "new_tokens": args.new,
              "limit": "CUDA out-of-memory" if budget is None else f"weights + KV <= {args.budget_gib} GiB (CPU)",
              "route_layer": default_route_layer(CONFIG.text_config.num_hidden_layers), "max_batch": {}}
    for variant in ("stock", "dpvr"):
        set_dpvr(model, variant == "dpvr")
        t0 = time.perf_counter()
        best = largest_batch(lambda b: _fits(model, CONFIG, b, args.prompt_text, args.new, DEVICE, DTYPE, budget),
                             args.max_batch)
        result["max_batch"][variant] = best
        print(f"capacity {variant}: largest batch {best} for {result['prompt_tokens']} + {args.new} tokens "
              f"({result['limit']}; search {time.perf_counter() - t0:.0f} s)", flush=True)
    stock, dpvr = result["max_batch"]["stock"], result["max_batch"]["dpvr"]
    result["ratio"] = dpvr / stock if stock else None
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if stock and dpvr else 1


if __name__ == "__main__":
    sys.exit(main())
