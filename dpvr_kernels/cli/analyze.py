"""``dpvr-kernels analyze``: the paper's saturation profile (text-to-image attention share per layer) and
the route layer it suggests; table, PNG and CSV."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from ..config import default_route_layer
from ..models.classes import vision_token_ids
from ..presets import size_config
from .common import (
    add_common,
    check_model_args,
    dtype_name,
    fraction,
    load_user_model,
    log,
    positive_int,
    resolve_device,
    resolve_dtype,
    resolve_size,
    user_inputs,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` on the subparsers ``sub``."""
    p = sub.add_parser("analyze", allow_abbrev=False,
                       help="text-to-image attention share per layer and the route layer it suggests",
                       description="The paper's saturation profile: per decoder layer, the share of the text "
                                   "tokens' attention that goes to image tokens, from a stock eager-attention "
                                   "forward; prints a table, writes OUT/analyze.png and OUT/analyze.csv, and "
                                   "suggests a route layer. With random weights (--size) the profile is not "
                                   "meaningful; --model DIR runs your checkpoint on --image/--prompt.")
    add_common(p, "Default: cpu on CPU, 7b on CUDA.")
    p.add_argument("--batch", type=positive_int, default=2, help="--size only: prompts (default 2)")
    p.add_argument("--text-tokens", type=positive_int, default=32, help="--size only: text tokens (default 32)")
    p.add_argument("--images", type=positive_int, default=1, help="--size only: images per prompt (default 1)")
    p.add_argument("--fraction", type=fraction, default=0.1,
                   help="route where the share stays <= FRACTION x its layer-0 value (default 0.1)")
    p.add_argument("--fusion-layers", type=positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--out", default="analyze_out", help="output directory (default analyze_out/)")
    p.set_defaults(func=run, parser=p)
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dpvr-kernels analyze``; returns the exit code."""
    from ..analysis import attention_to_image_profile, plot_profile, suggest_route_layer
    from ..workloads import build_model, synthetic_batch

    check_model_args(parser, args)
    device = resolve_device(parser, args.device)
    dtype = resolve_dtype(args.dtype, device)
    user = None
    if args.model is not None:
        user = load_user_model(parser, args.model, dtype, device, args.device, attn="eager")
        model, config, label = user.model, user.config, args.model
    else:
        size = resolve_size(args.size, device)
        config = size_config(size)
        log(f"analyze: building {size} model with random weights ({dtype_name(dtype)}, {device})")
        model = build_model(config, dtype=dtype, device=device, attn="eager", seed=args.seed)
        label = f"--size {size}, RANDOM WEIGHTS"
    n_layers = config.text_config.num_hidden_layers
    if args.fusion_layers > n_layers - 1:
        parser.error(f"--fusion-layers {args.fusion_layers} is out of range for {n_layers} layers (1..{n_layers - 1})")
    if user is not None:
        inputs = user_inputs(parser, user, args.image, args.prompt, batch=1)
        ids, mask, pixels = inputs.input_ids, inputs.attention_mask, inputs.kwargs.get("pixel_values")
        extra = {k: v for k, v in inputs.kwargs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        n_image = int(sum(int((ids == token).sum()) for token in vision_token_ids(config)))
        prompts = (f"  prompt: {len(inputs.image_files)} image(s) ({n_image} image tokens) and "
                   f"{args.prompt or 'the default question'!r} through the chat template; queries: text tokens after "
                   f"an image")
    else:
        batch = synthetic_batch(config, args.batch, args.text_tokens, images=args.images,
                                pad=args.text_tokens // 4, seed=args.seed, dtype=dtype, device=device)
        ids, mask, pixels, extra = batch.input_ids, batch.attention_mask, batch.pixel_values, {}
        prompts = (f"  prompts: {args.batch} x ({args.text_tokens} text tokens, {args.images} image(s), "
                   f"{batch.image_tokens} image tokens), synthetic; queries: text tokens after an image")
    try:
        profile = attention_to_image_profile(model, ids, mask, pixels, **extra)
    except ValueError as exc:  # e.g. no text token after the image: nothing to measure
        parser.error(str(exc))
    suggestion = suggest_route_layer(profile, args.fraction, args.fusion_layers)
    default = default_route_layer(n_layers, args.fusion_layers)
    threshold = args.fraction * profile[0]

    print(f"DPVR-LF saturation profile: share of text-token attention on image tokens, per decoder layer ({label})")
    if user is None:
        print("  NOTE: random weights (no checkpoint) - this profile is NOT meaningful; it only shows the "
              "measurement.\n  Run with --model DIR (your trained LLaVA and its processor) for a real profile; the "
              "paper reports 0.68 at layer 0, 0.07 by layer 4, ~0.04 after layer 18 (LLaVA-1.5-7B).")
    print(prompts)
    print(f"  {'layer':>5}  {'share':>7}  {'vs layer 0':>10}  ")
    print("  " + "-" * 48)
    for i, share in enumerate(profile):
        marks = []
        if i == suggestion:
            marks.append("<- suggested route layer")
        if i == default:
            marks.append("<- default route layer")
        if i >= n_layers - args.fusion_layers:
            marks.append("(fusion layer)")
        rel = f"{100 * share / profile[0]:.1f} %" if profile[0] > 0 else "-"
        bar = "#" * round(20 * share)
        print(f"  {i:>5}  {share:>7.4f}  {rel:>10}  {bar:<20} {' '.join(marks)}".rstrip())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path = out_dir / "analyze.png"
    plot_profile(profile, str(png_path), fraction=args.fraction, suggestion=suggestion,
                 fusion_layers=args.fusion_layers, title=f"Text-to-image attention share ({label})")
    csv_path = out_dir / "analyze.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "image_attention_share"])
        writer.writerows([i, f"{share:.6f}"] for i, share in enumerate(profile))
    rule = (f"first layer from which every layer up to the fusion layers stays <= {args.fraction:g} x layer 0 "
            f"= {threshold:.4f}")
    if suggestion is None:
        print(f"suggested route layer: none (the share never stays below the threshold: {rule}); "
              f"the default is {default}")
    else:
        print(f"suggested route layer: {suggestion} ({rule}); the default is {default}")
    print(f"wrote {png_path} and {csv_path}")
    return 0
