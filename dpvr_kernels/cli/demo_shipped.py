"""``dpvr-kernels demo`` without ``--model``/``--size``: the shipped digit-reading LLaVA, stock vs distilled DPVR-LF.

Real handwritten digit grids the model never saw in training go in (the held-out split of
:mod:`dpvr_kernels.digit_grids`); the stock model's and the distilled DPVR-LF model's greedy answers come out
side by side with the truth; then the held-out accuracy of both per question type, prefill time against the
cost model's ideal, and the numerics check of the DPVR-LF forward against the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formatting import fmt_seconds, render_columns
from .common import (
    FP32_TOLERANCE,
    HALF_TOLERANCE,
    dtype_name,
    log,
    rel_err,
    resolve_device,
    resolve_dtype,
    time_alternating,
)

#: The held-out items of the README's quality table: ``sample_items(n, "test", seed=HELD_OUT_SEED)``.
HELD_OUT_SEED = 2026
_SHADES = " .:-=+*#%@"


def ascii_grid(grid: np.ndarray) -> list[str]:
    """A 56 x 56 grid as 14 lines of 28 characters (4 x 2 pixel blocks, darker = more ink)."""
    blocks = grid.reshape(14, 4, 28, 2).mean(axis=(1, 3)) / 256.0
    return ["".join(_SHADES[int(v * len(_SHADES))] for v in row) for row in blocks]


def run_shipped(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The shipped-model demo; returns the exit code (1 when the numerics check fails)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dpvr_kernels

    from .. import digit_grids as grids
    from ..assets import demo_model
    from ..conversations import Example, collate
    from ..evaluation import encode_grid_items, flops_saved, greedy_answers, score
    from ..models.backbone import side_branch
    from ..reference import reference_forward
    from ..workloads import generate_position_ids

    try:
        stock_dir, dpvr_dir = demo_model(), demo_model(distilled=True)
        grids.mnist_split()
    except (FileNotFoundError, ImportError) as exc:
        parser.error(str(exc))
    device = resolve_device(parser, args.device)
    dtype = torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype, device)
    processor = AutoProcessor.from_pretrained(stock_dir, local_files_only=True)
    stock = AutoModelForImageTextToText.from_pretrained(stock_dir, local_files_only=True, dtype=dtype).to(device).eval()
    dpvr = AutoModelForImageTextToText.from_pretrained(dpvr_dir, local_files_only=True, dtype=dtype).to(device).eval()
    dpvr_kernels.patch(dpvr, backend=args.backend)  # the distilled side branch, at its saved route layer
    r, f = dpvr.config.dpvr["route_layer"], dpvr.config.dpvr["fusion_layers"]
    n_layers = dpvr.config.text_config.num_hidden_layers
    side = sum(p.numel() for p in side_branch(dpvr).parameters())
    total = sum(p.numel() for p in stock.parameters())

    # 1. a few held-out grids, both answers next to the truth
    items = grids.sample_items(args.samples, "test", seed=args.seed + 1)
    examples = encode_grid_items(processor, items)
    log(f"demo: {len(items)} held-out grids through stock and DPVR-LF (route layer {r})")
    with torch.no_grad():
        stock_answers, _ = greedy_answers(stock, processor, examples, batch=64, max_new_tokens=4)
        dpvr_answers, _ = greedy_answers(dpvr, processor, examples, batch=64, max_new_tokens=4)
    print(f"DPVR-LF demo on the shipped model: a LLaVA trained here on real handwritten digits "
          f"({total / 1e6:.1f}M parameters; CLIP tower, {n_layers}-layer Llama decoder)")
    print(f"  stock: {stock_dir}\n  DPVR-LF: {dpvr_dir} (side branch distilled at route layer {r}, "
          f"{side:,} parameters = {100 * side / total:.1f} % of the model)")
    print(f"  {device.type}, {dtype_name(dtype)}, torch {torch.__version__}; grids from the held-out split "
          "(handwriting never seen in training)\n")
    print(f"grid 1 of {len(items)} (digits {' '.join(map(str, items[0].digits))} in reading order):")
    print("\n".join("    " + line for line in ascii_grid(grids.render_grid("test", items[0].sources))))

    def mark(answer: str, truth: str) -> str:
        return f"{answer} {'ok' if answer == truth else 'WRONG'}"

    rows = [(str(i + 1), it.question, it.answer, mark(s, it.answer), mark(d, it.answer))
            for i, (it, s, d) in enumerate(zip(items, stock_answers, dpvr_answers, strict=True))]
    print("\n" + render_columns(("#", "question", "truth", "stock", f"DPVR-LF r={r}"), rows, left=2))

    # 2. held-out accuracy, per question type
    held = grids.sample_items(args.held_out, "test", seed=HELD_OUT_SEED)
    held_examples = encode_grid_items(processor, held)
    log(f"demo: held-out accuracy on {len(held)} grids")
    with torch.no_grad():
        stock_acc = score(greedy_answers(stock, processor, held_examples, batch=100, max_new_tokens=4)[0],
                          held_examples)
        dpvr_acc = score(greedy_answers(dpvr, processor, held_examples, batch=100, max_new_tokens=4)[0],
                         held_examples)
    chance = grids.chance_levels(held)
    kinds = [*grids.QUESTION_TYPES, "overall"]
    acc_rows = [(k, str(chance[k]["n"]), f"{100 * chance[k]['majority']:.1f}", f"{100 * stock_acc[k]:.1f}",
                 f"{100 * dpvr_acc[k]:.1f}", f"{100 * (dpvr_acc[k] - stock_acc[k]):+.1f}") for k in kinds]
    print(f"\nheld-out accuracy, exact match in % ({len(held)} grids, seed {HELD_OUT_SEED}; chance = always the most "
          "common answer):")
    print(render_columns(("type", "n", "chance", "stock", "DPVR-LF", "difference"), acc_rows))

    # 3. speed and 4. numerics, on one left-padded batch of held-out prompts
    batch_examples = held_examples[:args.batch]
    prompts = [Example(e.input_ids[:e.prompt_length], e.labels[:e.prompt_length], e.vision) for e in batch_examples]
    pad = processor.tokenizer.pad_token_id
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
             for k, v in collate(prompts, pad, padding_side="left").items() if k != "labels"}
    positions = generate_position_ids(batch["attention_mask"])
    current = {"model": stock}

    def set_mode(mode: str) -> None:
        current["model"] = stock if mode == "stock" else dpvr

    def forward() -> torch.Tensor:
        return current["model"](**batch, position_ids=positions, use_cache=False).logits

    with torch.no_grad():
        times, logits = time_alternating(forward, set_mode, args.repeats or 5, 1 if args.warmup is None else args.warmup,
                                         device)
        ref = reference_forward(dpvr, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                position_ids=positions)
    err = rel_err(logits, ref, batch["attention_mask"])
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE
    passed = err < tolerance
    saved = flops_saved(dpvr.config, batch_examples, r, f)
    t_stock, t_dpvr = statistics.median(times["stock"]), statistics.median(times["dpvr"])
    print(f"\nprefill of {len(prompts)} prompts (median of {len(times['stock'])}): stock {fmt_seconds(t_stock)}, "
          f"DPVR-LF {fmt_seconds(t_dpvr)}: {t_stock / t_dpvr:.2f}x measured vs {1 / (1 - saved):.2f}x ideal "
          f"(cost model: {100 * saved:.1f} % of the prefill FLOPs saved). At this size (3M parameters, "
          "~30 tokens) a CPU forward is bound by per-op overhead, not FLOPs: see `dpvr-kernels demo --size cpu` and "
          "the README's benchmarks for speed")
    print(f"numerics: {'PASS' if passed else 'FAIL'} (DPVR-LF logits vs reference_forward, max relative error "
          f"{err:.2e}, tolerance {tolerance:.0e})")
    print(dpvr_kernels.describe(dpvr))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "model": stock_dir, "distilled": dpvr_dir, "route_layer": r, "fusion_layers": f,
            "samples": [{"question": it.question, "truth": it.answer, "stock": s, "dpvr": d}
                        for it, s, d in zip(items, stock_answers, dpvr_answers, strict=True)],
            "held_out": {"n": len(held), "seed": HELD_OUT_SEED, "stock": stock_acc, "dpvr": dpvr_acc,
                         "chance": chance},
            "prefill_s": {"stock": t_stock, "dpvr": t_dpvr}, "ideal_prefill_speedup": 1 / (1 - saved),
            "numerics": {"max_rel_error": err, "tolerance": tolerance, "passed": passed},
        }, indent=1) + "\n")
        log(f"demo: wrote {path}")
    return 0 if passed else 1


def is_shipped_demo(args: argparse.Namespace) -> bool:
    """No ``--model`` and no ``--size``: the shipped model."""
    return args.model is None and args.size is None


def shipped_only(args: argparse.Namespace) -> list[str]:
    """Options of the shipped demo given with ``--model``/``--size`` (where they mean nothing)."""
    return [name for name, value in (("--samples", args.samples), ("--held-out", args.held_out)) if value is not None]


def defaults(args: argparse.Namespace) -> Any:
    args.samples = 8 if args.samples is None else args.samples
    args.held_out = 1000 if args.held_out is None else args.held_out
    args.batch = 64 if args.batch is None else args.batch
    return args
