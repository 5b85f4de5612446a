"""``dpvr-kernels bench``: prefill time, stock vs DPVR-LF, measured next to the cost model's ideal.

With ``--size`` it sweeps image tokens per sample (whole images) and batch sizes on a random-weight model;
with ``--model`` it runs your checkpoint on its processor's inputs for ``--image``/``--prompt`` at each batch
size. Writes ``OUT/bench.csv`` and ``OUT/bench.png``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..flops import CostReport, cost_model
from ..formatting import fmt_seconds
from ..models.classes import vision_token_ids
from ..presets import size_config
from ..vision_tokens import tokens_per_image
from .common import (
    add_common,
    check_model_args,
    dtype_name,
    int_list,
    load_user_model,
    log,
    nonneg_int,
    positive_int,
    resolve_device,
    resolve_dtype,
    resolve_size,
    route_or_exit,
    time_alternating,
    user_inputs,
)

BENCH_FIELDS = (
    "size", "model", "device", "dtype", "batch", "images", "image_tokens", "text_tokens", "route_layer",
    "fusion_layers", "repeats", "stock_ms", "dpvr_ms", "measured_speedup", "ideal_speedup",
    "ideal_decoder_speedup", "fraction_of_ideal", "flops_stock", "flops_dpvr",
)


def plot_bench(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """PNG: measured (solid) and ideal (dashed) prefill speedup against image tokens, one colour per batch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    batches = sorted({int(r["batch"]) for r in rows})
    xs_all = sorted({int(r["image_tokens"]) for r in rows})
    for i, b in enumerate(batches):
        pts = sorted((r for r in rows if int(r["batch"]) == b), key=lambda r: int(r["image_tokens"]))
        xs = [int(r["image_tokens"]) for r in pts]
        color = f"C{i % 10}"
        ax.plot(xs, [float(r["measured_speedup"]) for r in pts], marker="o", color=color,
                label=f"batch {b}: measured")
        ax.plot(xs, [float(r["ideal_speedup"]) for r in pts], marker="x", linestyle="--", color=color,
                label=f"batch {b}: ideal (FLOPs)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    if len(xs_all) > 1 and xs_all[-1] / xs_all[0] >= 4:
        ax.set_xscale("log")
    ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("image tokens per sample")
    ax.set_ylabel("prefill speedup DPVR-LF / stock")
    ax.set_title(title or "DPVR-LF prefill speedup", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the subparsers ``sub``."""
    p = sub.add_parser("bench", allow_abbrev=False, help="prefill speedup vs image tokens and batch size; CSV + PNG",
                       description="Time stock and DPVR-LF prefill (median) and report measured and ideal speedup; "
                                   "write OUT/bench.csv and OUT/bench.png. With --size: sweep image tokens per "
                                   "sample (whole images of the model's size) and batch sizes on random weights. "
                                   "With --model DIR: your checkpoint on --image/--prompt, per batch size.")
    add_common(p, "Default: cpu on CPU, 7b on CUDA.")
    p.add_argument("--image-tokens", type=int_list, default=None,
                   help="--size only: comma-separated image tokens per sample, multiples of the tokens per image "
                        "(default 144,576,2880: 1/4/20 images of 144 tokens for --size cpu, 9/36/180 of 16 for tiny; "
                        "576,2880 for 7b)")
    p.add_argument("--batches", type=int_list, default=None, help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--text-tokens", type=positive_int, default=None,
                   help="--size only: text tokens (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--route-layer", type=int, default=None, help="route layer (default round(N*18/32))")
    p.add_argument("--fusion-layers", type=positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed runs per point (default 3 on CPU, 5 on CUDA)")
    p.add_argument("--warmup", type=nonneg_int, default=None, help="untimed runs per point first (default 1)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, parser=p)
    return p


@dataclass
class _Point:
    batch: int
    images: int
    image_tokens: int
    text_tokens: int
    kwargs: Callable[[], dict[str, Any]]
    report: CostReport | None
    """``None``: the cost model does not price this class's inputs (``--model`` only; no ideal columns)."""


def _synthetic_points(args: argparse.Namespace, parser: argparse.ArgumentParser, config: Any, size: str,
                      device: torch.device, dtype: torch.dtype, r: int, f: int) -> list[_Point]:
    from ..workloads import synthetic_batch

    per_image = tokens_per_image(config)
    image_counts = args.image_tokens or ([576, 2880] if size == "7b" else [144, 576, 2880])
    bad = [n for n in image_counts if n % per_image]
    if bad:
        parser.error(f"--image-tokens {','.join(map(str, bad))}: not a multiple of the {per_image} tokens per "
                     f"image of --size {size} (each point is a whole number of images); e.g. "
                     f"{per_image},{4 * per_image},{20 * per_image}")
    text_tokens = args.text_tokens if args.text_tokens is not None else (64 if device.type == "cuda" else 32)
    elem = torch.empty((), dtype=dtype).element_size()
    points = []
    for b in args.batches or [1, 4]:
        for n_image in image_counts:
            def kwargs(b=b, n_image=n_image) -> dict[str, Any]:
                return synthetic_batch(config, b, text_tokens, images=n_image // per_image, pad=0, seed=args.seed,
                                       dtype=dtype, device=device).as_kwargs()

            points.append(_Point(b, n_image // per_image, n_image, text_tokens, kwargs,
                                 cost_model(config, n_image, text_tokens, b, r, f, dtype_bytes=elem)))
    return points


def _model_points(args: argparse.Namespace, parser: argparse.ArgumentParser, user: Any, dtype: torch.dtype,
                  r: int, f: int) -> list[_Point]:
    config = user.config
    elem = torch.empty((), dtype=dtype).element_size()
    vision_ids = vision_token_ids(config)
    points = []
    for b in args.batches or [1, 4]:
        inputs = user_inputs(parser, user, args.image, args.prompt, batch=b)
        ids, mask = inputs.input_ids[0], inputs.attention_mask[0].bool()
        n_vision = int(sum(int((ids == i).sum()) for i in vision_ids))
        n_text = int(mask.sum()) - n_vision
        try:
            report = cost_model(config, inputs.vision if inputs.vision is not None else n_vision, n_text, b, r, f,
                                dtype_bytes=elem)
        except (ValueError, TypeError) as exc:
            # A supported class whose vision tower the cost model does not price (DeepSeek-VL, Janus, Ovis2, ...) is
            # still timed, as demo does ("cost model n/a"): its ideal columns are NaN instead of refusing the bench.
            log(f"bench: the cost model cannot price this model's inputs ({exc}); no ideal speedup")
            report = None
        points.append(_Point(b, len(inputs.image_files), n_vision, n_text, lambda kw=inputs.kwargs: kw, report))
    return points


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dpvr-kernels bench``; returns the exit code."""
    from tqdm import tqdm

    from ..workloads import build_model, set_dpvr

    check_model_args(parser, args)
    if args.model is not None and (args.image_tokens is not None or args.text_tokens is not None):
        parser.error("--image-tokens and --text-tokens size the synthetic prompts of --size; with --model the "
                     "prompt is --image and --prompt")
    device = resolve_device(parser, args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model is not None:
        user = load_user_model(parser, args.model, dtype, device, args.device)
        model, config, size, label = user.model, user.config, "model", args.model
        device = model.device
    else:
        size = resolve_size(args.size, device)
        config = size_config(size)
        label = getattr(config, "name_or_path", size)
    repeats = args.repeats if args.repeats is not None else (5 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else 1
    n_layers = config.text_config.num_hidden_layers
    r, f = route_or_exit(parser, config, args.route_layer, args.fusion_layers)
    if args.model is not None:
        points = _model_points(args, parser, user, dtype, r, f)
    else:
        points = _synthetic_points(args, parser, config, size, device, dtype, r, f)
        log(f"bench: building {size} model with random weights ({dtype_name(dtype)}, {device})")
        model = build_model(config, dtype=dtype, device=device, attn="sdpa", seed=args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def set_mode(mode: str) -> None:
        set_dpvr(model, mode == "dpvr", route_layer=r, fusion_layers=f)

    try:
        set_mode("dpvr")
    except (ValueError, TypeError, NotImplementedError) as exc:
        parser.error(f"DPVR-LF cannot patch this model: {exc}")
    rows: list[dict[str, Any]] = []
    with torch.no_grad(), tqdm(total=len(points) * (warmup + repeats), desc="bench", unit="pair", file=sys.stderr,
                               disable=args.no_progress) as bar:
        for point in points:
            kwargs = point.kwargs()

            def forward(kwargs=kwargs) -> None:
                model(**kwargs, use_cache=False)

            bar.set_postfix_str(f"B={point.batch} img={point.image_tokens}")
            runs, _ = time_alternating(forward, set_mode, repeats, warmup, device,
                                       on_run=lambda mode: bar.update(1) if mode == "dpvr" else None)
            times = {mode: statistics.median(ts) for mode, ts in runs.items()}
            measured = times["stock"] / times["dpvr"]
            report = point.report
            ideal = report.ideal_prefill_speedup if report is not None else float("nan")
            rows.append({
                "size": size, "model": label, "device": device.type,
                "dtype": dtype_name(dtype), "batch": point.batch, "images": point.images,
                "image_tokens": point.image_tokens, "text_tokens": point.text_tokens, "route_layer": r,
                "fusion_layers": f, "repeats": repeats,
                "stock_ms": round(times["stock"] * 1e3, 3), "dpvr_ms": round(times["dpvr"] * 1e3, 3),
                "measured_speedup": round(measured, 4), "ideal_speedup": round(ideal, 4),
                "ideal_decoder_speedup": round(report.ideal_decoder_speedup, 4) if report is not None else ideal,
                "fraction_of_ideal": round(measured / ideal, 4),
                "flops_stock": report.flops_stock if report is not None else ideal,
                "flops_dpvr": report.flops_dpvr if report is not None else ideal,
            })

    csv_path = out_dir / "bench.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=BENCH_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png_path = out_dir / "bench.png"
    weights = f"--model {args.model}" if args.model else f"--size {size}, random weights"
    text = f"{points[0].text_tokens} text tokens"
    plot_bench(rows, png_path, title=f"DPVR-LF prefill speedup, {weights}, {dtype_name(dtype)} on {device.type}\n"
                                     f"route layer {r} of {n_layers}, {text}")

    header = (f"  {'batch':>5}  {'image tok':>9}  {'stock':>10}  {'DPVR-LF':>10}  {'measured':>8}  {'ideal':>6}  "
              f"of ideal")
    print(f"DPVR-LF prefill bench - {weights} ({dtype_name(dtype)}, {device.type}), route layer {r} "
          f"of {n_layers}, {text}, median of {repeats}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        priced = row["ideal_speedup"] == row["ideal_speedup"]  # NaN: not priced by the cost model
        ideal = f"{row['ideal_speedup']:>5.2f}x  {100 * row['fraction_of_ideal']:.0f} %" if priced else "  n/a"
        print(f"  {row['batch']:>5}  {row['image_tokens']:>9}  {fmt_seconds(row['stock_ms'] / 1e3):>10}  "
              f"{fmt_seconds(row['dpvr_ms'] / 1e3):>10}  {row['measured_speedup']:>7.2f}x  {ideal}")
    print(f"wrote {csv_path} and {png_path}")
    return 0
