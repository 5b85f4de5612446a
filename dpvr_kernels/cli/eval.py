"""``dpvr-kernels eval``: does DPVR-LF keep your model's answers? Stock vs DPVR-LF per route layer.

Greedy answers from the stock forward and from DPVR-LF on LLaVA conversation data; exact-match accuracy per
question type (records' ``type``; needs reference answers), agreement with stock's answers, the mean
KL(stock || DPVR-LF) per answer token, the prefill FLOPs saved (cost model) and throughput. A model with a
distilled side branch (``config.dpvr``) is evaluated at its own route layer; a stock model gets an untrained
side branch (a copy of the route layer) at each ``--route-layers`` value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .common import log, positive_int


def _route_layers(text: str) -> list[int] | str:
    if text == "all":
        return text
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layers such as 2,4,6; got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layers >= 0; got {text!r}")
    return values


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on the subparsers ``sub``."""
    p = sub.add_parser("eval", allow_abbrev=False,
                       help="accuracy, agreement with stock, answer KL and FLOPs saved per route layer",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model folder (save_pretrained model + processor), demo or demo-dpvr")
    p.add_argument("--data", required=True, metavar="FILE", help="LLaVA conversation records (JSON list or JSONL)")
    p.add_argument("--image-folder", required=True, metavar="DIR", help="folder the records' image paths are under")
    p.add_argument("--route-layers", type=_route_layers, default=None,
                   help="comma-separated route layers, or all (0..N-f-1); default: the model's own (config.dpvr) "
                        "or round(N*18/32)")
    p.add_argument("--fusion-layers", type=positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--side-branch", metavar="DIR", default=None,
                   help="a --side-branch-only distill output to apply to --model first")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    p.add_argument("--batch-size", type=positive_int, default=32, help="records per batch (default 32)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="greedy answer length (default 16)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="accuracy (or agreement) against FLOPs saved per route layer (default: next to --json)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.set_defaults(func=run, parser=p)
    return p


def _table(rows: list[Any], types: list[str]) -> str:
    from ..formatting import render_columns

    head = ("", "route", "FLOPs saved", *types, "agree w/ stock", "answer KL", "samples/s")
    lines = []
    for row in rows:
        acc = row.accuracy or {}
        lines.append(("stock" if row.route_layer is None else "DPVR-LF",
                      "-" if row.route_layer is None else str(row.route_layer),
                      f"{100 * row.flops_saved:.1f} %",
                      *[f"{100 * acc[t]:.1f}" if t in acc else "-" for t in types],
                      "-" if row.agreement is None else f"{100 * row.agreement:.1f} %",
                      "-" if row.answer_kl is None else f"{row.answer_kl:.4f}",
                      f"{row.samples_per_s:.1f}"))
    return render_columns(head, lines, left=2)


def plot(rows: list[Any], path: str, title: str) -> None:
    """Accuracy (overall; agreement if unscored) against prefill FLOPs saved, one point per route layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scored = rows[0].accuracy is not None
    metric = (lambda r: 100 * r.accuracy["overall"]) if scored else (lambda r: 100 * (r.agreement or 1.0))
    dpvr = [r for r in rows if r.route_layer is not None]
    ax.plot([100 * r.flops_saved for r in dpvr], [metric(r) for r in dpvr], marker="o", label="DPVR-LF")
    for r in dpvr:
        ax.annotate(f"r={r.route_layer}", (100 * r.flops_saved, metric(r)), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(metric(rows[0]) if scored else 100.0, color="gray", linestyle="--", label="stock")
    ax.set_xlabel("prefill FLOPs saved (%)")
    ax.set_ylabel("exact-match accuracy (%)" if scored else "agreement with stock (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dpvr-kernels eval``; returns the exit code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..assets import resolve_model_name
    from ..config import default_route_layer, validate_route
    from ..conversations import DataError, encode, load_records, read_images
    from ..distill import load_side_branch
    from ..evaluation import evaluate

    try:
        model_dir = resolve_model_name(args.model)
    except FileNotFoundError as exc:
        parser.error(f"--model {args.model}: {exc}")
    if not (Path(model_dir) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; pass a folder written by save_pretrained")
    try:
        records = load_records(args.data)
    except DataError as exc:
        parser.error(str(exc))
    records = records[:args.limit] if args.limit else records
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    try:
        examples = [encode(processor, r, read_images(i, r, args.image_folder), i) for i, r in enumerate(records)]
    except DataError as exc:
        parser.error(str(exc))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    n_layers = model.config.text_config.num_hidden_layers
    if args.side_branch is not None:
        try:
            load_side_branch(model, args.side_branch)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--side-branch {args.side_branch}: {exc}")
    saved = getattr(model.config, "dpvr", None)
    if saved:
        import dpvr_kernels

        dpvr_kernels.patch(model)  # restores the distilled side branch with its settings
        trained = Path(model_dir) / "distill.json"
        if trained.is_file() and json.loads(trained.read_text()).get("settings", {}).get("train_fusion"):
            print(f"warning: the fusion layers of {args.model} were trained, so its stock row is not the base "
                  "model's; for that, distil with --side-branch-only and pass the base as --model with "
                  "--side-branch", file=sys.stderr)
        own = model.config.dpvr["route_layer"]
        if args.route_layers not in (None, [own]):
            parser.error(f"--route-layers: {args.model} has a distilled side branch at route layer {own}; it is "
                         "evaluated there (use the stock folder to compare untrained side branches elsewhere)")
        layers = [own]
        fusion = model.config.dpvr["fusion_layers"]
    else:
        fusion = args.fusion_layers
        if args.route_layers == "all":
            layers = list(range(0, n_layers - fusion))
        else:
            layers = args.route_layers or [default_route_layer(n_layers, fusion)]
        for r in layers:
            try:
                validate_route(n_layers, r, fusion)
            except ValueError as exc:
                parser.error(f"--route-layers: {exc}")
    has_types = any(e.type for e in examples)
    log(f"eval: {len(examples)} records, stock then DPVR-LF at route layer(s) {layers}")
    rows = evaluate(model, processor, examples, layers, fusion, batch=args.batch_size,
                    max_new_tokens=args.max_new_tokens, progress=lambda m: log(f"eval: {m}"))
    types = [t for t in dict.fromkeys(e.type for e in examples) if t] if has_types else []
    scored = rows[0].accuracy is not None
    types = [*sorted(types), "overall"] if scored else []
    machine = f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, " \
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    distilled = "distilled side branch" if saved or args.side_branch else "untrained side branch (copy of layer r)"
    print(f"DPVR-LF eval: {args.model} on {args.data} ({len(examples)} records); {distilled}; {machine}")
    if scored:
        print("accuracy columns: exact match in % per question type")
    print(_table(rows, types))
    payload = {"model": args.model, "data": args.data, "records": len(examples), "fusion_layers": fusion,
               "side_branch": "distilled" if saved or args.side_branch else "untrained", "machine": machine,
               "stock": rows[0].as_dict(), "dpvr": [r.as_dict() for r in rows[1:]],
               "per_record": [{"id": e.id, "type": e.type, "reference": e.answer, "stock": rows[0].answers[i],
                               **{f"dpvr_r{r.route_layer}": r.answers[i] for r in rows[1:]}}
                              for i, e in enumerate(examples)]}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n")
        log(f"eval: wrote {path}")
    png = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if png:
        plot(rows, png, f"{args.model}: {len(examples)} records, {distilled}")
        log(f"eval: wrote {png}")
    return 0
