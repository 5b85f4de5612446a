"""``dpvr-kernels demo``: stock vs DPVR-LF on one model, one table.

* ``--model DIR_OR_HUB_ID``: your checkpoint and its processor (offline), your ``--image`` files (default: a
  sample image shipped with the package) and ``--prompt`` through the processor's chat template; both
  greedy answers side by side, prefill time, decode tokens/s, KV-cache bytes, the cost model's ideal
  and the numerics check against :func:`dpvr_kernels.reference.reference_forward`.
* ``--size``: a random-weight LLaVA on synthetic prompts (batches with padding): the same measurements.

Exit code 0 when the numerics PASS, 1 when they FAIL, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import dpvr_kernels

from ..flops import cost_model
from ..formatting import fmt_bytes, fmt_seconds, fmt_si, render_table
from ..models.classes import vision_token_ids
from ..presets import size_config
from ..vision_tokens import tokens_per_image
from . import demo_shipped
from .common import (
    BACKENDS,
    FP32_TOLERANCE,
    HALF_TOLERANCE,
    add_common,
    check_model_args,
    dtype_name,
    load_user_model,
    log,
    model_shape,
    nonneg_int,
    positive_int,
    rel_err,
    resolve_device,
    resolve_dtype,
    resolve_size,
    route_or_exit,
    sync,
    time_alternating,
    user_inputs,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the subparsers ``sub``."""
    p = sub.add_parser("demo", allow_abbrev=False,
                       help="stock vs DPVR-LF: the shipped digit-reading model (default), your model (--model) or "
                            "a random-weight LLaVA (--size): answers, accuracy, speed, KV cache, numerics",
                       description="Run stock and DPVR-LF on the same inputs. By default the shipped model (a LLaVA "
                                   "trained here on real handwritten digits) and its distilled DPVR-LF side branch: "
                                   "held-out digit grids with both answers and the truth, held-out accuracy, speed "
                                   "and numerics. With --model DIR your checkpoint, its processor, --image and "
                                   "--prompt (both answers side by side); with --size a LLaVA with random weights on "
                                   "synthetic prompts. Prints prefill and decode timings next to the cost model's "
                                   "ideal, KV-cache bytes, and the numerics check against the reference forward. "
                                   "Exit code 1 if numerics FAIL.")
    add_common(p, "Without --size and --model: the shipped digit-reading model, stock vs distilled DPVR-LF.")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="shipped model: held-out grids shown with both answers and the truth (default 8)")
    p.add_argument("--held-out", type=positive_int, default=None,
                   help="shipped model: held-out grids scored for accuracy (default 1000, the README's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24,
                   help="with --model: greedy answer length in tokens (default 24)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="prompts (default 4 on CPU, 8 on CUDA; with --model 1: copies of the prompt)")
    p.add_argument("--text-tokens", type=positive_int, default=None,
                   help="synthetic prompts: text tokens of the longest prompt (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--images", type=positive_int, default=None,
                   help="synthetic prompts: images per prompt (default 1)")
    p.add_argument("--pad", type=nonneg_int, default=None,
                   help="synthetic prompts: left padding of the shortest prompt; prompts in between get less "
                        "(default text-tokens/4)")
    p.add_argument("--route-layer", type=int, default=None, help="route layer (default round(N*18/32))")
    p.add_argument("--fusion-layers", type=positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="synthetic prompts: greedy decode steps (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed prefill runs, the median is reported (default 3 on CPU, 5 on CUDA)")
    p.add_argument("--warmup", type=nonneg_int, default=None,
                   help="untimed prefill runs first (default 1 on CUDA, for tiny and with --model, else 0: the "
                        "median absorbs a slow first run)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="route_split/fuse_merge kernels (default auto)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.set_defaults(func=run, parser=p)
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dpvr-kernels demo``; returns the exit code."""
    check_model_args(parser, args)
    if demo_shipped.is_shipped_demo(args):
        synthetic_only = [name for name, value in (("--text-tokens", args.text_tokens), ("--images", args.images),
                                                   ("--pad", args.pad), ("--steps", args.steps),
                                                   ("--route-layer", args.route_layer)) if value is not None]
        if synthetic_only:
            parser.error(f"{', '.join(synthetic_only)}: not options of the shipped-model demo (its DPVR-LF model is "
                         "distilled at its own route layer); use them with --size or --model")
        return demo_shipped.run_shipped(demo_shipped.defaults(args), parser)
    if demo_shipped.shipped_only(args):
        parser.error(f"{', '.join(demo_shipped.shipped_only(args))} go with the shipped-model demo (no --model, "
                     "no --size)")
    if args.model is not None:
        synthetic_only = [name for name, value in (("--text-tokens", args.text_tokens), ("--images", args.images),
                                                   ("--pad", args.pad), ("--steps", args.steps)) if value is not None]
        if synthetic_only:
            parser.error(f"{', '.join(synthetic_only)} shape the synthetic prompts of --size; with --model the "
                         f"prompt is --prompt and --image (and --max-new-tokens the answer length)")
        return _demo_model(args, parser)
    return _demo_synthetic(args, parser)


def _write_json(path_arg: str, payload: dict[str, Any]) -> None:
    path = Path(path_arg)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"demo: wrote {path}")


def _where(device: torch.device, threads_given: bool) -> str:
    if device.type == "cpu":
        threads = f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"
        if hasattr(os, "getloadavg"):
            threads += f", load average {os.getloadavg()[0]:.1f}"
        if not threads_given:
            threads += "; --threads to override"
        return threads
    return torch.cuda.get_device_name(device)


def _vs(measured: float, ideal: float) -> str:
    if ideal != ideal:  # no cost model for these inputs (NaN)
        return f"{measured:.2f}x measured (no ideal: the cost model does not price these inputs)"
    return f"{measured:.2f}x measured vs {ideal:.2f}x ideal ({100 * measured / ideal:.0f} % of ideal)"


def _kv_note(measured: int, predicted: int) -> str:
    return "= cost model" if measured == predicted else f"cost model {fmt_bytes(predicted)}"


def _numerics_row(err: float, tolerance: float, dtype: torch.dtype) -> tuple[str, ...]:
    return ("numerics (max rel. error)", "-", f"{err:.2e}",
            f"{'PASS' if err < tolerance else 'FAIL'} (< {tolerance:.0e}: patched logits vs reference_forward in "
            f"{dtype_name(dtype)}, valid positions)")


def _describe_rows(description: str) -> list[tuple[str, ...]]:
    return [("kernels (describe)" if i == 0 else "", line.strip() if i == 0 else line)
            for i, line in enumerate(description.splitlines())]


def _outcome(err: float, dtype: torch.dtype, model: Any,
             results: dict[str, dict[str, Any]]) -> tuple[float, bool, str, float, float]:
    """``(tolerance, passed, describe(model), prefill speedup, decode speedup)`` of a finished demo run."""
    import dpvr_kernels

    tolerance = FP32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE
    stock, dpvr = results["stock"], results["dpvr"]
    return (tolerance, err < tolerance, dpvr_kernels.describe(model), stock["prefill_s"] / dpvr["prefill_s"],
            dpvr["decode_tokens_per_s"] / stock["decode_tokens_per_s"])


# ----------------------------------------------------------------------------------------- the user's model


class _StepClock:
    """A generate stopping criterion that only records when each new token is ready (never stops)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def tokens_per_s(self, batch: int) -> float:
        """Decode throughput: tokens after the first (which the prefill makes) over the time they took."""
        if len(self.stamps) < 2:
            return float("nan")
        return batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def _demo_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from transformers import StoppingCriteriaList

    from ..models.backbone import CACHE_KW, side_branch
    from ..models.cache import kv_cache_bytes
    from ..ops.backends import resolve_backend
    from ..reference import reference_forward
    from ..workloads import prompt_position_ids

    device = resolve_device(parser, args.device)
    dtype = resolve_dtype(args.dtype, device)
    user = load_user_model(parser, args.model, dtype, device, args.device)
    model, config, processor = user.model, user.config, user.processor
    inputs = user_inputs(parser, user, args.image, args.prompt, batch=args.batch or 1)
    run_device = model.device
    cuda = run_device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (5 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else 1
    n_layers = config.text_config.num_hidden_layers
    saved = getattr(config, "dpvr", None)  # a distilled checkpoint: its side branch and route layer
    if saved and args.route_layer is None:
        r, f = route_or_exit(parser, config, saved["route_layer"], saved["fusion_layers"])
    else:
        r, f = route_or_exit(parser, config, args.route_layer, args.fusion_layers)
    try:  # an unsupported class or bad settings fail here, with the library's message, before any timing
        dpvr_kernels.patch(model, route_layer=r, fusion_layers=f, backend=args.backend)
        resolve_backend(args.backend, run_device)
        params_side = sum(p.numel() for p in side_branch(model).parameters())
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
        parser.error(f"--model {args.model}: DPVR-LF cannot patch this model: {exc}")
    distilled = bool(saved) and (saved["route_layer"], saved["fusion_layers"]) == (r, f)
    params_stock = sum(p.numel() for p in model.parameters()) - params_side
    # Stock is the same weights under dpvr_kernels.stock_forward: the patch (and a distilled side branch) stays.
    modes = contextlib.ExitStack()

    def set_mode(mode: str) -> None:
        modes.close()
        if mode == "stock":
            modes.enter_context(dpvr_kernels.stock_forward(model))

    kwargs = inputs.kwargs
    mask = inputs.attention_mask
    positions = prompt_position_ids(model, mask)  # None for M-RoPE classes: the model derives them
    vision_ids = vision_token_ids(config)
    is_vision = torch.zeros_like(mask, dtype=torch.bool)
    for token in vision_ids:
        is_vision |= inputs.input_ids == token
    bsz = inputs.input_ids.shape[0]
    n_vision = int(is_vision[0].sum())
    n_text = int((mask[0].bool() & ~is_vision[0]).sum())
    elem = torch.empty((), dtype=dtype).element_size()
    try:
        report = cost_model(config, inputs.vision if inputs.vision is not None else n_vision, n_text, bsz, r, f,
                            dtype_bytes=elem)
        report_note = None
    except (ValueError, TypeError) as exc:
        report, report_note = None, str(exc)

    def forward() -> torch.Tensor:
        return model(**kwargs, position_ids=positions, use_cache=False).logits

    pad_id = getattr(processor.tokenizer, "pad_token_id", None)
    eos_id = getattr(processor.tokenizer, "eos_token_id", None)
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "num_beams": 1,
                  "suppress_tokens": vision_ids or None,  # a trained model never emits them; DPVR refuses them
                  "pad_token_id": pad_id if pad_id is not None else eos_id}
    results: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        log(f"demo: prefill, stock and DPVR-LF alternating, {warmup} warmup + {repeats} timed each, "
            f"batch {bsz} x {inputs.input_ids.shape[1]} tokens")
        times, logits = time_alternating(forward, set_mode, repeats, warmup, run_device)
        for mode in ("stock", "dpvr"):
            set_mode(mode)
            out = model(**kwargs, position_ids=positions, use_cache=True, logits_to_keep=1)
            kv = kv_cache_bytes(getattr(out, CACHE_KW))
            del out
            log(f"demo: {mode} generate, up to {args.max_new_tokens} new tokens")
            clock = _StepClock(run_device)
            generated = model.generate(**kwargs, **gen_kwargs, stopping_criteria=StoppingCriteriaList([clock]))
            new_tokens = generated[:, inputs.input_ids.shape[1]:]
            answer = processor.batch_decode(new_tokens[:1], skip_special_tokens=True)[0].strip()
            results[mode] = {"prefill_s": statistics.median(times[mode]), "prefill_runs_s": times[mode],
                             "decode_tokens_per_s": clock.tokens_per_s(bsz), "new_tokens": int(new_tokens.shape[1]),
                             "kv_bytes": kv, "answer": answer, "token_ids": new_tokens[0].tolist()}
        log("demo: numerics vs reference_forward")
        set_mode("dpvr")
        extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        try:
            ref = reference_forward(model, inputs.input_ids, kwargs.get("pixel_values"), mask,
                                    position_ids=positions, **extra)
        except TypeError as exc:
            parser.error(f"--model {args.model}: the reference forward does not take this model's inputs "
                         f"({', '.join(extra)}): {exc}")
        err = rel_err(logits, ref, mask)
    tolerance, passed, description, prefill_speedup, decode_speedup = _outcome(err, dtype, model, results)
    stock, dpvr = results["stock"], results["dpvr"]
    params_dpvr = params_stock + params_side
    model_line, vision_line = model_shape(config)
    files = ", ".join(f"{Path(name).name} {w}x{h} px" for name, (h, w) in zip(inputs.image_files, inputs.image_sizes,
                                                                           strict=True))
    rows: list[tuple[str, ...]] = [
        ("model", f"{type(model).__name__} from {args.model}"),
        ("decoder", model_line),
        ("vision tower", vision_line),
        ("inputs", f"{len(inputs.image_files)} image(s) ({files}) + prompt {args.prompt or '(default)'!r} "
                   f"through the chat template"),
        ("tokens per sample", f"{n_vision + n_text} = {n_vision} image + {n_text} text"
                              + (f" (x {bsz} copies)" if bsz > 1 else "")),
        ("route / fusion", f"image tokens leave at layer {r}: layers [0,{r}) full, side branch = copy of layer "
                           f"{r}, [{r},{n_layers - f}) text only, fusion [{n_layers - f},{n_layers})"),
        ("parameters", f"{params_stock:,}", f"{params_dpvr:,}",
         f"side branch {params_side:,} = {100 * params_side / params_dpvr:.2f} % trainable"),
    ]
    if report is not None:
        rows += [
            ("prefill FLOPs (cost model)", fmt_si(report.flops_stock, "FLOP", 2), fmt_si(report.flops_dpvr, "FLOP", 2),
             f"saved {100 * (1 - report.flops_dpvr / report.flops_stock):.1f} %; {report.vision_summary()}"),
            ("KV cache, cost model", fmt_bytes(report.kv_bytes_stock), fmt_bytes(report.kv_bytes_dpvr),
             f"saved {100 * report.kv_savings:.1f} %"),
        ]
    else:
        rows.append(("cost model", f"n/a: {report_note}"))
    kv_detail = (f" (stock {_kv_note(stock['kv_bytes'], report.kv_bytes_stock)}, "
                 f"DPVR {_kv_note(dpvr['kv_bytes'], report.kv_bytes_dpvr)})") if report is not None else ""
    ideal_prefill = report.ideal_prefill_speedup if report is not None else float("nan")
    ideal_decode = report.ideal_decode_speedup if report is not None else float("nan")
    rows += [
        ("KV cache, measured", fmt_bytes(stock["kv_bytes"]), fmt_bytes(dpvr["kv_bytes"]),
         f"saved {100 * (1 - dpvr['kv_bytes'] / stock['kv_bytes']):.1f} %{kv_detail}"),
        (f"prefill time (median of {repeats})", fmt_seconds(stock["prefill_s"]), fmt_seconds(dpvr["prefill_s"]),
         _vs(prefill_speedup, ideal_prefill)),
        ("decode (generate, tokens/s)", f"{stock['decode_tokens_per_s']:.1f}", f"{dpvr['decode_tokens_per_s']:.1f}",
         _vs(decode_speedup, ideal_decode)),
        _numerics_row(err, tolerance, dtype),
    ]
    rows += _describe_rows(description)
    title = [
        f"DPVR-LF demo on your model: {args.model}",
        f"  {run_device.type} ({_where(run_device, args.threads is not None)}), {dtype_name(dtype)}, torch "
        f"{torch.__version__}{', device_map=auto' if user.device_map else ''}; ideal = cost-model FLOP ratio "
        f"(dpvr_kernels.cost_model)",
        "",
    ]
    print(render_table(title, ("", "stock", "DPVR-LF", "DPVR-LF vs stock"), rows))
    same = stock["token_ids"] == dpvr["token_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(stock["token_ids"], dpvr["token_ids"], strict=False))
                       if a != b), min(len(stock["token_ids"]), len(dpvr["token_ids"])))
    width = max(len(stock["answer"]), 8)
    print(f"\nanswers (greedy, up to {args.max_new_tokens} new tokens; sample 1 of {bsz}):")
    print(f"  {'stock':<{width}}  |  DPVR-LF")
    print(f"  {stock['answer']:<{width}}  |  {dpvr['answer']}")
    if same:
        print("  same tokens")
    elif distilled:
        print(f"  the answers differ from token {first_diff} on, with the distilled side branch; measure how often "
              "on your data with `dpvr-kernels eval`")
    else:
        print(f"  the answers differ from token {first_diff} on: DPVR-LF computes the deep layers without the image "
              f"tokens and its side branch is an untrained copy of layer {r}; distill it (`dpvr-kernels distill`) to "
              "bring the answers together")
    print(f"numerics: {'PASS' if passed else 'FAIL'} (max relative error {err:.3e}, tolerance {tolerance:.0e})")

    if args.json:
        _write_json(args.json, {
            "random_weights": False, "model": args.model, "class": type(model).__name__, "device": str(run_device),
            "distilled_side_branch": distilled,
            "dtype": dtype_name(dtype), "torch": torch.__version__, "batch": bsz, "prompt": inputs.prompt_text,
            "images": inputs.image_files, "tokens": {"image": n_vision, "text": n_text}, "route_layer": r,
            "fusion_layers": f,
            "params": {"stock": params_stock, "side_branch": params_side, "dpvr": params_dpvr},
            "stock": stock, "dpvr": dpvr, "same_answer": same,
            "measured_prefill_speedup": prefill_speedup, "ideal_prefill_speedup": ideal_prefill,
            "measured_decode_speedup": decode_speedup, "ideal_decode_speedup": ideal_decode,
            "numerics": {"max_rel_error": err, "tolerance": tolerance, "passed": passed},
            "describe": description, "cost_model": report.as_dict() if report is not None else None,
        })
    return 0 if passed else 1


# ------------------------------------------------------------------------------------- random-weight model


def _demo_synthetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:

    from ..models.backbone import side_branch
    from ..models.cache import kv_cache_bytes
    from ..ops.backends import resolve_backend
    from ..reference import reference_forward
    from ..workloads import (
        build_model,
        decode,
        generate_position_ids,
        prefill,
        set_dpvr,
        synthetic_batch,
    )

    device = resolve_device(parser, args.device)
    dtype = resolve_dtype(args.dtype, device)
    size = resolve_size(args.size, device)
    n_images = args.images if args.images is not None else 1
    cuda = device.type == "cuda"
    bsz = args.batch if args.batch is not None else (8 if cuda else 4)
    text_tokens = args.text_tokens if args.text_tokens is not None else (64 if cuda else 32)
    steps = args.steps if args.steps is not None else (32 if cuda else 8)
    repeats = args.repeats if args.repeats is not None else (5 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (1 if cuda or size == "tiny" else 0)
    pad = args.pad if args.pad is not None else text_tokens // 4
    if pad >= text_tokens:
        parser.error(f"--pad {pad} must be smaller than --text-tokens {text_tokens} (every sample keeps text)")

    config = size_config(size)
    n_layers = config.text_config.num_hidden_layers
    r, f = route_or_exit(parser, config, args.route_layer, args.fusion_layers)
    per_image = tokens_per_image(config)
    image_tokens = n_images * per_image
    elem = torch.empty((), dtype=dtype).element_size()
    report = cost_model(config, image_tokens, text_tokens, bsz, r, f, dtype_bytes=elem)

    batch = synthetic_batch(config, bsz, text_tokens, images=n_images, pad=pad, seed=args.seed,
                            dtype=dtype, device=device)
    mask = batch.attention_mask
    positions = generate_position_ids(mask)
    is_image = batch.input_ids == config.image_token_id
    n_text = int((mask.bool() & ~is_image).sum())
    n_image = int(is_image.sum())
    n_pad = int((mask == 0).sum())
    pads = (mask == 0).sum(-1).tolist()
    text_per = (mask.bool() & ~is_image).sum(-1).tolist()

    log(f"demo: building {size} model with random weights ({dtype_name(dtype)}, {device})")
    model = build_model(config, dtype=dtype, device=device, attn="sdpa", seed=args.seed)
    params_stock = sum(p.numel() for p in model.parameters())

    def forward() -> torch.Tensor:
        return model(**batch.as_kwargs(), position_ids=positions, use_cache=False).logits

    def set_mode(mode: str) -> None:
        set_dpvr(model, mode == "dpvr", route_layer=r, fusion_layers=f, backend=args.backend)

    try:  # bad settings fail here, with the library's message, before anything is timed
        set_mode("dpvr")
        resolve_backend(args.backend, device)
        params_side = sum(p.numel() for p in side_branch(model).parameters())
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))

    results: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        log(f"demo: prefill, stock and DPVR-LF alternating, {warmup} warmup + {repeats} timed each, "
             f"batch {bsz} x {batch.input_ids.shape[1]}")
        times, logits = time_alternating(forward, set_mode, repeats, warmup, device)
        for mode in ("stock", "dpvr"):
            log(f"demo: {mode} decode, {steps} steps")
            set_mode(mode)
            tokens, cache = prefill(model, batch)
            kv = kv_cache_bytes(cache)
            sync(device)
            start = time.perf_counter()
            decode(model, batch, tokens, cache, steps)
            sync(device)
            t_dec = time.perf_counter() - start
            del cache
            results[mode] = {"prefill_s": statistics.median(times[mode]), "prefill_runs_s": times[mode],
                             "decode_s": t_dec, "decode_tokens_per_s": bsz * steps / t_dec, "kv_bytes": kv}
        log("demo: numerics vs reference_forward")
        ref = reference_forward(model, batch.input_ids, batch.pixel_values, mask, position_ids=positions)
        err = rel_err(logits, ref, mask)
    tolerance, passed, description, prefill_speedup, decode_speedup = _outcome(err, dtype, model, results)
    stock, dpvr = results["stock"], results["dpvr"]
    params_dpvr = params_stock + params_side
    model_line, vision_line = model_shape(config)
    threads = _where(device, args.threads is not None)

    rows: list[tuple[str, ...]] = [
        ("model", model_line),
        ("vision tower", vision_line),
        ("batch", f"{bsz} prompts, padded length {batch.input_ids.shape[1]}, left padding {min(pads)}..{max(pads)} tokens"),
        ("tokens per stream", f"text {n_text} / image {n_image} / pad {n_pad} (whole batch; text per sample "
                              f"{min(text_per)}..{max(text_per)}, {n_images} image(s) x {per_image})"),
        ("route / fusion", f"image tokens leave at layer {r}: layers [0,{r}) full, side branch = copy of layer "
                           f"{r}, [{r},{n_layers - f}) text only, fusion [{n_layers - f},{n_layers})"),
        ("parameters", f"{params_stock:,}", f"{params_dpvr:,}",
         f"side branch {params_side:,} = {100 * params_side / params_dpvr:.2f} % trainable"),
        ("prefill FLOPs (cost model)", fmt_si(report.flops_stock, "FLOP", 2), fmt_si(report.flops_dpvr, "FLOP", 2),
         f"saved {fmt_si(report.flops_stock - report.flops_dpvr, 'FLOP', 2)} "
         f"({100 * (1 - report.flops_dpvr / report.flops_stock):.1f} %), at the padded length"),
        ("KV cache, cost model", fmt_bytes(report.kv_bytes_stock), fmt_bytes(report.kv_bytes_dpvr),
         f"saved {100 * report.kv_savings:.1f} %"),
        ("KV cache, measured", fmt_bytes(stock["kv_bytes"]), fmt_bytes(dpvr["kv_bytes"]),
         f"saved {100 * (1 - dpvr['kv_bytes'] / stock['kv_bytes']):.1f} % "
         f"(stock {_kv_note(stock['kv_bytes'], report.kv_bytes_stock)}, "
         f"DPVR {_kv_note(dpvr['kv_bytes'], report.kv_bytes_dpvr)})"),
        (f"prefill time (median of {repeats})", fmt_seconds(stock["prefill_s"]), fmt_seconds(dpvr["prefill_s"]),
         _vs(prefill_speedup, report.ideal_prefill_speedup)),
        (f"decode ({steps} steps, tokens/s)", f"{stock['decode_tokens_per_s']:.1f}",
         f"{dpvr['decode_tokens_per_s']:.1f}", _vs(decode_speedup, report.ideal_decode_speedup)),
        _numerics_row(err, tolerance, dtype),
    ]
    rows += _describe_rows(description)
    title = [
        "DPVR-LF demo - RANDOM WEIGHTS (model built from a config, no checkpoint): timings, FLOPs and memory "
        "are real, generated tokens are not meaningful",
        f"  {device.type} ({threads}), {dtype_name(dtype)}, torch {torch.__version__}, seed {args.seed}; "
        f"ideal = cost-model FLOP ratio (dpvr_kernels.cost_model)",
        "",
    ]
    print(render_table(title, ("", "stock", "DPVR-LF", "DPVR-LF vs stock"), rows))
    print(f"numerics: {'PASS' if passed else 'FAIL'} (max relative error {err:.3e}, tolerance {tolerance:.0e})")

    if args.json:
        _write_json(args.json, {
            "random_weights": True,
            "size": size,
            "device": str(device),
            "dtype": dtype_name(dtype),
            "torch": torch.__version__,
            "batch": bsz,
            "text_tokens": text_tokens,
            "images": n_images,
            "image_tokens": image_tokens,
            "pad": pad,
            "tokens": {"text": n_text, "image": n_image, "pad": n_pad},
            "route_layer": r,
            "fusion_layers": f,
            "decode_steps": steps,
            "params": {"stock": params_stock, "side_branch": params_side, "dpvr": params_dpvr,
                       "trainable_fraction": params_side / params_dpvr},
            "stock": stock,
            "dpvr": dpvr,
            "measured_prefill_speedup": prefill_speedup,
            "ideal_prefill_speedup": report.ideal_prefill_speedup,
            "measured_decode_speedup": decode_speedup,
            "ideal_decode_speedup": report.ideal_decode_speedup,
            "numerics": {"max_rel_error": err, "tolerance": tolerance, "passed": passed},
            "describe": description,
            "cost_model": report.as_dict(),
        })
    return 0 if passed else 1
