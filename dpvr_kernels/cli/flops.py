"""``dpvr-kernels flops``: the exact cost model (no model is built) for named configs or config files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ..flops import cost_model, route_layer_table
from ..formatting import fmt_bytes, fmt_si
from ..presets import NAMED_CONFIGS, TYPICAL_INPUTS, named_config
from ..vision_tokens import VisionWork, image_work, video_work
from .common import nonneg_int, positive_int


def _hw(text: str) -> tuple[int, int]:
    """An argparse type: ``HEIGHTxWIDTH`` in pixels (or one number for a square)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels such as 672x672 (or 672), got {text!r}")
    return (values[0], values[-1])


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``flops`` on the subparsers ``sub``."""
    typical = ", ".join(f"{k} {h}x{w}" for k, (h, w) in TYPICAL_INPUTS.items())
    p = sub.add_parser("flops", allow_abbrev=False,
                       help="parameters, prefill FLOPs and KV bytes per route layer (cost model)",
                       description="Exact cost model (no model is built): parameters, trainable share and, per "
                                   "route layer, prefill FLOPs, ideal speedups and KV-cache bytes. With "
                                   "--route-layer, the full report for that layer. Vision tokens follow each "
                                   "model's processor: anyres tiles and newline tokens (LLaVA-NeXT, -OneVision), "
                                   "pooled video frames (LLaVA-NeXT-Video, -OneVision), dynamic-resolution "
                                   "grids (Qwen2/2.5/3-VL, GLM-4V), tiles with pixel shuffle (InternVL, "
                                   "SmolVLM/Idefics3), Pixtral patch rows (Mistral3).")
    p.add_argument("--config", action="append", default=None, metavar="NAME",
                   help=f"named config, repeatable: {', '.join(NAMED_CONFIGS)} (default: all, unless --config-file)")
    p.add_argument("--config-file", action="append", default=None, metavar="PATH",
                   help="a config.json of a checkpoint (llava, llava_next, llava_next_video, llava_onevision, "
                        "vipllava, qwen2_vl, qwen2_5_vl, qwen3_vl, glm4v, internvl, smolvlm, idefics3, mistral3), "
                        "repeatable")
    p.add_argument("--model", action="append", default=None, metavar="DIR",
                   help="a model folder (its config.json), or demo / demo-dpvr (the shipped digit model), repeatable")
    p.add_argument("--image-size", action="append", type=_hw, default=None, metavar="HxW",
                   help="an image per sample of HEIGHTxWIDTH pixels, repeatable (default: one typical image: "
                        f"{typical}; the tower's input size for --config-file)")
    p.add_argument("--video-frames", action="append", type=positive_int, default=None, metavar="N",
                   help="a video of N frames per sample, repeatable (llava_next_video, llava_onevision; Qwen-VL "
                        "videos need a frame size: call dpvr_kernels.vision_tokens.video_work in Python)")
    p.add_argument("--image-tokens", type=nonneg_int, default=None,
                   help="instead of --image-size: image tokens per sample, whole images of one tower pass each "
                        "(not for anyres models)")
    p.add_argument("--text-tokens", type=nonneg_int, default=64, help="text tokens per sample (default 64)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--route-layer", type=int, default=None, help="print the full report for this route layer")
    p.add_argument("--fusion-layers", type=positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per KV element (default 2: fp16/bf16)")
    p.set_defaults(func=run, parser=p)
    return p


def _vision(args: argparse.Namespace, cfg: Any, typical: tuple[int, int]) -> VisionWork:
    """The vision inputs of one sample from ``--image-size``/``--video-frames`` (default: one typical image)."""
    sizes = args.image_size if args.image_size is not None else ([] if args.video_frames else [typical])
    multi = len(sizes) > 1
    work = VisionWork(0, 0, 0)
    for h, w in sizes:
        work = work + image_work(cfg, h, w, multi_image=multi)
    for frames in args.video_frames or []:
        work = work + video_work(cfg, frames)
    return work


def _read_config(parser: argparse.ArgumentParser, path: str) -> Any:
    from transformers import AutoConfig

    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        parser.error(f"--config-file {path}: cannot read a config JSON ({exc})")
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if not model_type:
        parser.error(f"--config-file {path}: no model_type in it; pass the config.json of a LLaVA checkpoint")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as exc:
        parser.error(f"--config-file {path}: not a config transformers can read ({exc})")
    if getattr(cfg, "vision_config", None) is None:
        parser.error(f"--config-file {path}: model_type {model_type!r} has no vision tower; pass a LLaVA-family "
                     f"config.json")
    return cfg


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dpvr-kernels flops``; returns the exit code."""
    if args.image_tokens is not None and (args.image_size or args.video_frames):
        parser.error("--image-tokens replaces --image-size/--video-frames (whole images as tokens); pass one or the "
                     "other")
    from pathlib import Path

    from ..assets import resolve_model_name

    entries: list[tuple[str, Any, tuple[int, int]]] = []
    for spec in args.model or []:
        try:
            folder = Path(resolve_model_name(spec))
        except FileNotFoundError as exc:
            parser.error(f"--model {spec}: {exc}")
        if not (folder / "config.json").is_file():
            parser.error(f"--model {spec}: no config.json in {folder}; pass a folder written by save_pretrained")
        args.config_file = [*(args.config_file or []), str(folder / "config.json")]
    names = args.config or ([] if args.config_file else list(NAMED_CONFIGS))
    for name in names:
        key = name.strip().lower()
        if key not in NAMED_CONFIGS:
            parser.error(f"unknown config {name!r}: choose from {', '.join(NAMED_CONFIGS)} "
                         f"(or pass a checkpoint's config.json with --config-file)")
        entries.append((key, named_config(key), TYPICAL_INPUTS[key]))
    for path in args.config_file or []:
        cfg = _read_config(parser, path)
        size = cfg.vision_config.image_size
        entries.append((path, cfg, (size, size) if isinstance(size, int) else tuple(size)))

    blocks = []
    for label, cfg, typical in entries:
        try:
            image_tokens = args.image_tokens if args.image_tokens is not None else _vision(args, cfg, typical)
            if args.route_layer is not None:
                rep = cost_model(cfg, image_tokens, args.text_tokens, args.batch, args.route_layer,
                                 args.fusion_layers, args.dtype_bytes)
                blocks.append(rep.as_table().replace(f"cost model: {rep.model}", f"cost model: {label}", 1))
                continue
            rows = route_layer_table(cfg, image_tokens, args.text_tokens, args.batch, args.fusion_layers,
                                     args.dtype_bytes)
            rep = cost_model(cfg, image_tokens, args.text_tokens, args.batch, None, args.fusion_layers,
                             args.dtype_bytes)
        except (ValueError, TypeError) as exc:
            parser.error(f"{label}: {exc}")
        blocks.append(_flops_block(label, rep, rows))
    print("\n\n".join(blocks))
    return 0



def _flops_block(label: str, rep: Any, rows: Sequence[dict[str, Any]]) -> str:
    n, f = rep.num_layers, rep.fusion_layers
    lines = [
        f"{label}: {rep.params_total:,} parameters; side branch (1 decoder layer) {rep.params_side_branch:,} "
        f"= {100 * rep.trainable_fraction:.3f} % trainable of {rep.params_dpvr_total:,} "
        f"({100 * rep.side_branch_fraction_of_stock:.3f} % of stock)",
        f"  batch {rep.batch} x ({rep.image_tokens} image + {rep.text_tokens} text tokens), "
        f"{rep.vision_summary()} per sample, {n} layers, {f} fusion layer(s), KV {rep.dtype_bytes} B/elem",
        f"  stock: prefill {fmt_si(rep.flops_stock, 'FLOP', 2)} ({rep.flops_stock:,}), KV cache "
        f"{fmt_bytes(rep.kv_bytes_stock)}; * = default route layer {rep.route_layer}",
        "",
    ]
    head = (f"  {'route':>6}  {'text-only':>9}  {'prefill FLOPs':>14}  {'ideal':>8}  {'KV cache':>11}  {'KV':>7}  "
            f"{'ideal':>8}")
    head2 = (f"  {'layer':>6}  {'layers':>9}  {'DPVR-LF':>14}  {'prefill':>8}  {'DPVR-LF':>11}  {'saved':>7}  "
             f"{'decode':>8}")
    lines += [head, head2, "  " + "-" * (len(head) - 2)]
    for row in rows:
        mark = "*" if row["route_layer"] == rep.route_layer else " "
        lines.append(
            f"  {row['route_layer']:>5}{mark}  {row['text_only_layers']:>9}  {fmt_si(row['flops_dpvr'], 'FLOP', 2):>14}  "
            f"{row['ideal_prefill_speedup']:>7.3f}x  {fmt_bytes(row['kv_bytes_dpvr']):>11}  "
            f"{100 * row['kv_savings']:>6.1f}%  {row['ideal_decode_speedup']:>7.3f}x"
        )
    return "\n".join(lines)
