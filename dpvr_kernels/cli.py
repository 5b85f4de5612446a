"""The ``dpvr-kernels`` command line: ``demo``, ``bench``, ``analyze`` and ``flops``.

* ``demo``: a random-weight LLaVA, stock vs DPVR-LF: prefill and decode timings next to the cost model's
  ideal speedups, FLOPs and KV-cache bytes (predicted and measured), a numerics check against
  :func:`dpvr_kernels.reference.reference_forward`, and which kernels ran.
* ``bench``: prefill speedup (measured and ideal) over image-token counts and batch sizes; CSV + PNG.
* ``analyze``: the paper's saturation profile (text-to-image attention share per layer) and the route
  layer it suggests; table + PNG.
* ``flops``: parameters, FLOPs and KV bytes per route layer for named LLaVA configs or a config file.

Every subcommand has ``--help``; bad arguments exit with code 2 and a message that names the fix.
Progress and warnings go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .flops import (
    NAMED_CONFIGS,
    TYPICAL_IMAGE_TOKENS,
    cost_model,
    default_route_layer,
    fmt_bytes,
    fmt_si,
    named_config,
    route_layer_table,
    scaled_config,
    validate_route,
)

SIZES = ("tiny", "cpu", "7b")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
#: Largest max relative logits error accepted by ``demo``: fp32, and half precision (same-dtype reference).
FP32_TOLERANCE = 1e-5
HALF_TOLERANCE = 2e-2


# ------------------------------------------------------------------------------------------------ helpers


def size_config(size: str) -> Any:
    """The ``LlavaConfig`` of a ``--size``.

    * ``"tiny"``: decoder 4 layers x 128 (4 heads), vocab 1000, CLIP 2 layers x 64 on 56 px / patch 14
      (16 image tokens per image); for tests, runs in seconds.
    * ``"cpu"``: :func:`~dpvr_kernels.flops.scaled_config` (decoder 16 layers x 1024, 144 image tokens).
    * ``"7b"``: :func:`~dpvr_kernels.flops.named_config` ``("llava-1.5-7b")`` (a GPU size).
    """
    if size == "tiny":
        return scaled_config(hidden=128, layers=4, heads=4, vocab=1000, vision_hidden=64, vision_layers=2,
                             vision_heads=2, image_size=56, patch_size=14, name="llava-tiny-h128-l4")
    if size == "cpu":
        return scaled_config()
    if size == "7b":
        return named_config("llava-1.5-7b")
    raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")


def default_threads(size: str | None) -> int:
    """CPU threads for a run: 1 for ``tiny``; else torch's default, capped to the cores not busy already.

    The cap is ``cpu_count - round(load average)`` (at least 1). On a shared machine an intra-op thread that
    waits for a busy core stalls every parallel op (about a scheduler time slice each), which makes runs
    slower and the stock-vs-DPVR comparison noisy; on an idle machine this is torch's default.
    """
    if size == "tiny":
        return 1
    threads = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        threads = min(threads, max(1, idle))
    return threads


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, with a clear message otherwise."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive integers such as 144,576,2880; got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers; got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
                     "use --device cpu or auto")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _resolve_size(name: str | None, device: torch.device) -> str:
    if name is not None:
        return name
    return "7b" if device.type == "cuda" else "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_alternating(run: Callable[[], Any], set_mode: Callable[[str], None], repeats: int, warmup: int,
                      device: torch.device, on_run: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], Any]:
    """Time ``run`` in stock and DPVR-LF mode alternately (stock, dpvr, stock, dpvr, ...).

    Alternating makes a change in machine load (other jobs) hit both modes alike. ``set_mode("stock" |
    "dpvr")`` switches the model. Returns the timed seconds per mode (``warmup`` untimed rounds first)
    and the output of the last DPVR-LF run.
    """
    times: dict[str, list[float]] = {"stock": [], "dpvr": []}
    last = None
    for i in range(warmup + repeats):
        for mode in ("stock", "dpvr"):
            set_mode(mode)
            _sync(device)
            start = time.perf_counter()
            out = run()
            _sync(device)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[mode].append(elapsed)
            if mode == "dpvr":
                last = out
            del out
            if on_run is not None:
                on_run(mode)
    return times, last


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference over valid positions, relative to the reference's max abs value there."""
    valid = mask.bool()
    diff = (out.float() - ref.float())[valid].abs().max()
    return float(diff / ref.float()[valid].abs().max().clamp(min=torch.finfo(torch.float32).tiny))


def _render(title: Sequence[str], header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned text table. A row is ``(label, stock, dpvr, note)`` or ``(label, text)`` spanning the rest."""
    full = [r for r in rows if len(r) == 4]
    w0 = max(len(header[0]), *(len(r[0]) for r in rows))
    w1 = max(len(header[1]), *(len(r[1]) for r in full)) if full else len(header[1])
    w2 = max(len(header[2]), *(len(r[2]) for r in full)) if full else len(header[2])
    lines = list(title)
    head = f"  {header[0]:<{w0}}  {header[1]:>{w1}}  {header[2]:>{w2}}  {header[3]}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        if len(r) == 4:
            lines.append(f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]}".rstrip())
        else:
            lines.append(f"  {r[0]:<{w0}}  {r[1]}".rstrip())
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"[dpvr-kernels] {message}", file=sys.stderr, flush=True)


def _model_shape(config: Any) -> tuple[str, str]:
    t, v = config.text_config, config.vision_config
    kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    text = (f"{getattr(config, 'name_or_path', '') or 'llava'}: decoder {t.num_hidden_layers} layers x "
            f"{t.hidden_size} ({t.num_attention_heads} heads, {kv} KV), MLP {t.intermediate_size}, "
            f"vocab {t.vocab_size}")
    from .workloads import tokens_per_image

    vision = (f"CLIP {v.num_hidden_layers} layers x {v.hidden_size}, {v.image_size} px / patch {v.patch_size}"
              f" -> {tokens_per_image(config)} tokens per image")
    return text, vision


def _add_common(p: argparse.ArgumentParser, size_default_help: str) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                   help="weights and activations dtype (default: auto = bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="model shape, random weights: tiny (seconds; tests), cpu (scaled LLaVA-1.5: 16 layers x "
                        f"1024, 144 tokens/image), 7b (LLaVA-1.5-7B shapes; GPU). {size_default_help}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: 1 for --size tiny, whose ops are too small to split; "
                        "else torch's default capped to the idle cores, cores - load average, at least 1: "
                        "threads that wait for a busy core make every op slow and timings noisy)")


# --------------------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dpvr_kernels

    from .models.cache import kv_cache_bytes
    from .ops.backends import resolve_backend
    from .reference import reference_forward
    from .workloads import (
        build_model,
        decode,
        generate_position_ids,
        prefill,
        set_dpvr,
        synthetic_batch,
        tokens_per_image,
    )

    device = _resolve_device(parser, args.device)
    dtype = _resolve_dtype(args.dtype, device)
    size = _resolve_size(args.size, device)
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
    try:
        r, f = validate_route(n_layers, args.route_layer, args.fusion_layers)
    except ValueError as exc:
        parser.error(str(exc))
    per_image = tokens_per_image(config)
    image_tokens = args.images * per_image
    elem = torch.empty((), dtype=dtype).element_size()
    report = cost_model(config, image_tokens, text_tokens, bsz, r, f, dtype_bytes=elem)

    batch = synthetic_batch(config, bsz, text_tokens, images=args.images, pad=pad, seed=args.seed,
                            dtype=dtype, device=device)
    mask = batch.attention_mask
    positions = generate_position_ids(mask)
    is_image = batch.input_ids == config.image_token_id
    n_text = int((mask.bool() & ~is_image).sum())
    n_image = int(is_image.sum())
    n_pad = int((mask == 0).sum())
    pads = (mask == 0).sum(-1).tolist()
    text_per = (mask.bool() & ~is_image).sum(-1).tolist()

    _log(f"demo: building {size} model with random weights ({_dtype_name(dtype)}, {device})")
    model = build_model(config, dtype=dtype, device=device, attn="sdpa", seed=args.seed)
    params_stock = sum(p.numel() for p in model.parameters())

    def forward() -> torch.Tensor:
        return model(**batch.as_kwargs(), position_ids=positions, use_cache=False).logits

    def set_mode(mode: str) -> None:
        set_dpvr(model, mode == "dpvr", route_layer=r, fusion_layers=f, backend=args.backend)

    try:  # bad settings fail here, with the library's message, before anything is timed
        set_mode("dpvr")
        resolve_backend(args.backend, device)
        params_side = sum(p.numel() for p in model.model.language_model.dpvr_side_branch.parameters())
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))

    results: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        _log(f"demo: prefill, stock and DPVR-LF alternating, {warmup} warmup + {repeats} timed each, "
             f"batch {bsz} x {batch.input_ids.shape[1]}")
        times, logits = _time_alternating(forward, set_mode, repeats, warmup, device)
        for mode in ("stock", "dpvr"):
            _log(f"demo: {mode} decode, {steps} steps")
            set_mode(mode)
            tokens, cache = prefill(model, batch)
            kv = kv_cache_bytes(cache)
            _sync(device)
            start = time.perf_counter()
            decode(model, batch, tokens, cache, steps)
            _sync(device)
            t_dec = time.perf_counter() - start
            del cache
            results[mode] = {"prefill_s": statistics.median(times[mode]), "prefill_runs_s": times[mode],
                             "decode_s": t_dec, "decode_tokens_per_s": bsz * steps / t_dec, "kv_bytes": kv}
        _log("demo: numerics vs reference_forward")
        ref = reference_forward(model, batch.input_ids, batch.pixel_values, mask, position_ids=positions)
        err = _rel_err(logits, ref, mask)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE
    passed = err < tolerance
    description = dpvr_kernels.describe(model)

    stock, dpvr = results["stock"], results["dpvr"]
    prefill_speedup = stock["prefill_s"] / dpvr["prefill_s"]
    decode_speedup = dpvr["decode_tokens_per_s"] / stock["decode_tokens_per_s"]
    params_dpvr = params_stock + params_side
    model_line, vision_line = _model_shape(config)
    if device.type == "cpu":
        threads = f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"
        if hasattr(os, "getloadavg"):
            threads += f", load average {os.getloadavg()[0]:.1f}"
        if args.threads is None:
            threads += "; --threads to override"
    else:
        threads = torch.cuda.get_device_name(device)

    def vs(measured: float, ideal: float) -> str:
        return f"{measured:.2f}x measured vs {ideal:.2f}x ideal ({100 * measured / ideal:.0f} % of ideal)"

    def kv_note(measured: int, predicted: int) -> str:
        return "= cost model" if measured == predicted else f"cost model {fmt_bytes(predicted)}"

    rows: list[tuple[str, ...]] = [
        ("model", model_line),
        ("vision tower", vision_line),
        ("batch", f"{bsz} prompts, padded length {batch.input_ids.shape[1]}, left padding {min(pads)}..{max(pads)} tokens"),
        ("tokens per stream", f"text {n_text} / image {n_image} / pad {n_pad} (whole batch; text per sample "
                              f"{min(text_per)}..{max(text_per)}, {args.images} image(s) x {per_image})"),
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
         f"(stock {kv_note(stock['kv_bytes'], report.kv_bytes_stock)}, "
         f"DPVR {kv_note(dpvr['kv_bytes'], report.kv_bytes_dpvr)})"),
        (f"prefill time (median of {repeats})", _seconds(stock["prefill_s"]), _seconds(dpvr["prefill_s"]),
         vs(prefill_speedup, report.ideal_prefill_speedup)),
        (f"decode ({steps} steps, tokens/s)", f"{stock['decode_tokens_per_s']:.1f}",
         f"{dpvr['decode_tokens_per_s']:.1f}", vs(decode_speedup, report.ideal_decode_speedup)),
        ("numerics (max rel. error)", "-", f"{err:.2e}",
         f"{'PASS' if passed else 'FAIL'} (< {tolerance:.0e}: patched logits vs reference_forward in "
         f"{_dtype_name(dtype)}, valid positions)"),
    ]
    for i, line in enumerate(description.splitlines()):
        rows.append(("kernels (describe)" if i == 0 else "", line.strip() if i == 0 else line))
    title = [
        "DPVR-LF demo - RANDOM WEIGHTS (model built from a config, no checkpoint): timings, FLOPs and memory "
        "are real, generated tokens are not meaningful",
        f"  {device.type} ({threads}), {_dtype_name(dtype)}, torch {torch.__version__}, seed {args.seed}; "
        f"ideal = cost-model FLOP ratio (dpvr_kernels.cost_model)",
        "",
    ]
    print(_render(title, ("", "stock", "DPVR-LF", "DPVR-LF vs stock"), rows))
    print(f"numerics: {'PASS' if passed else 'FAIL'} (max relative error {err:.3e}, tolerance {tolerance:.0e})")

    if args.json:
        payload = {
            "random_weights": True,
            "size": size,
            "device": str(device),
            "dtype": _dtype_name(dtype),
            "torch": torch.__version__,
            "batch": bsz,
            "text_tokens": text_tokens,
            "images": args.images,
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
        }
        path = Path(args.json)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        _log(f"demo: wrote {path}")
    return 0 if passed else 1


# -------------------------------------------------------------------------------------------------- bench

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


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm import tqdm

    from .workloads import build_model, set_dpvr, synthetic_batch, tokens_per_image

    device = _resolve_device(parser, args.device)
    dtype = _resolve_dtype(args.dtype, device)
    size = _resolve_size(args.size, device)
    config = size_config(size)
    per_image = tokens_per_image(config)
    image_counts = args.image_tokens or ([576, 2880] if size == "7b" else [144, 576, 2880])
    bad = [n for n in image_counts if n % per_image]
    if bad:
        parser.error(f"--image-tokens {','.join(map(str, bad))}: not a multiple of the {per_image} tokens per "
                     f"image of --size {size} (each point is a whole number of images); e.g. "
                     f"{per_image},{4 * per_image},{20 * per_image}")
    batches = args.batches or [1, 4]
    text_tokens = args.text_tokens if args.text_tokens is not None else (64 if device.type == "cuda" else 32)
    repeats = args.repeats if args.repeats is not None else (5 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else 1
    n_layers = config.text_config.num_hidden_layers
    try:
        r, f = validate_route(n_layers, args.route_layer, args.fusion_layers)
    except ValueError as exc:
        parser.error(str(exc))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    elem = torch.empty((), dtype=dtype).element_size()

    _log(f"bench: building {size} model with random weights ({_dtype_name(dtype)}, {device})")
    model = build_model(config, dtype=dtype, device=device, attn="sdpa", seed=args.seed)
    points = [(b, n) for b in batches for n in image_counts]

    def set_mode(mode: str) -> None:
        set_dpvr(model, mode == "dpvr", route_layer=r, fusion_layers=f)

    rows: list[dict[str, Any]] = []
    with torch.no_grad(), tqdm(total=len(points) * (warmup + repeats), desc="bench", unit="pair", file=sys.stderr,
                               disable=args.no_progress) as bar:
        for b, n_image in points:
            batch = synthetic_batch(config, b, text_tokens, images=n_image // per_image, pad=0, seed=args.seed,
                                    dtype=dtype, device=device)
            report = cost_model(config, n_image, text_tokens, b, r, f, dtype_bytes=elem)

            def forward(batch=batch) -> None:
                model(**batch.as_kwargs(), use_cache=False)

            bar.set_postfix_str(f"B={b} img={n_image}")
            runs, _ = _time_alternating(forward, set_mode, repeats, warmup, device,
                                        on_run=lambda mode: bar.update(1) if mode == "dpvr" else None)
            times = {mode: statistics.median(ts) for mode, ts in runs.items()}
            measured = times["stock"] / times["dpvr"]
            rows.append({
                "size": size, "model": getattr(config, "name_or_path", size), "device": device.type,
                "dtype": _dtype_name(dtype), "batch": b, "images": n_image // per_image, "image_tokens": n_image,
                "text_tokens": text_tokens, "route_layer": r, "fusion_layers": f, "repeats": repeats,
                "stock_ms": round(times["stock"] * 1e3, 3), "dpvr_ms": round(times["dpvr"] * 1e3, 3),
                "measured_speedup": round(measured, 4), "ideal_speedup": round(report.ideal_prefill_speedup, 4),
                "ideal_decoder_speedup": round(report.ideal_decoder_speedup, 4),
                "fraction_of_ideal": round(measured / report.ideal_prefill_speedup, 4),
                "flops_stock": report.flops_stock, "flops_dpvr": report.flops_dpvr,
            })

    csv_path = out_dir / "bench.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=BENCH_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png_path = out_dir / "bench.png"
    plot_bench(rows, png_path, title=f"DPVR-LF prefill speedup, --size {size}, {_dtype_name(dtype)} on {device.type}\n"
                                     f"route layer {r} of {n_layers}, {text_tokens} text tokens, random weights")

    header = f"  {'batch':>5}  {'image tok':>9}  {'stock':>10}  {'DPVR-LF':>10}  {'measured':>8}  {'ideal':>6}  of ideal"
    print(f"DPVR-LF prefill bench - random weights, {size} ({_dtype_name(dtype)}, {device.type}), route layer {r} "
          f"of {n_layers}, {text_tokens} text tokens, median of {repeats}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        print(f"  {row['batch']:>5}  {row['image_tokens']:>9}  {_seconds(row['stock_ms'] / 1e3):>10}  "
              f"{_seconds(row['dpvr_ms'] / 1e3):>10}  {row['measured_speedup']:>7.2f}x  {row['ideal_speedup']:>5.2f}x"
              f"  {100 * row['fraction_of_ideal']:.0f} %")
    print(f"wrote {csv_path} and {png_path}")
    return 0


# ------------------------------------------------------------------------------------------------ analyze


def _cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .analysis import attention_to_image_profile, plot_profile, suggest_route_layer
    from .workloads import build_model, synthetic_batch

    device = _resolve_device(parser, args.device)
    dtype = _resolve_dtype(args.dtype, device)
    if args.model_path:
        from transformers import LlavaForConditionalGeneration

        if not os.path.isdir(args.model_path):
            parser.error(f"--model-path {args.model_path}: not a directory (a local LLaVA checkpoint, saved with "
                         f"save_pretrained; nothing is downloaded)")
        _log(f"analyze: loading {args.model_path}")
        model = LlavaForConditionalGeneration.from_pretrained(
            args.model_path, local_files_only=True, dtype=dtype, attn_implementation="eager"
        ).to(device).eval()
        config = model.config
        label = args.model_path
    else:
        size = _resolve_size(args.size, device)
        config = size_config(size)
        _log(f"analyze: building {size} model with random weights ({_dtype_name(dtype)}, {device})")
        model = build_model(config, dtype=dtype, device=device, attn="eager", seed=args.seed)
        label = f"--size {size}, RANDOM WEIGHTS"
    n_layers = config.text_config.num_hidden_layers
    if args.fusion_layers > n_layers - 1:
        parser.error(f"--fusion-layers {args.fusion_layers} is out of range for {n_layers} layers (1..{n_layers - 1})")
    batch = synthetic_batch(config, args.batch, args.text_tokens, images=args.images, pad=args.text_tokens // 4,
                            seed=args.seed, dtype=dtype, device=device)
    try:
        profile = attention_to_image_profile(model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    except ValueError as exc:  # e.g. no text token after the image: nothing to measure
        parser.error(str(exc))
    suggestion = suggest_route_layer(profile, args.fraction, args.fusion_layers)
    default = default_route_layer(n_layers, args.fusion_layers)
    threshold = args.fraction * profile[0]

    print(f"DPVR-LF saturation profile: share of text-token attention on image tokens, per decoder layer ({label})")
    if not args.model_path:
        print("  NOTE: random weights (no checkpoint) - this profile is NOT meaningful; it only shows the "
              "measurement.\n  Run with --model-path DIR (a local trained LLaVA) for a real profile; the paper "
              "reports 0.68 at layer 0, 0.07 by layer 4, ~0.04 after layer 18 (LLaVA-1.5-7B).")
    print(f"  prompts: {args.batch} x ({args.text_tokens} text tokens, {args.images} image(s), "
          f"{batch.image_tokens} image tokens), synthetic; queries: text tokens after an image")
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


# -------------------------------------------------------------------------------------------------- flops


def _cmd_flops(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .workloads import tokens_per_image

    entries: list[tuple[str, Any, int]] = []
    names = args.config or ([] if args.config_file else list(NAMED_CONFIGS))
    for name in names:
        key = name.strip().lower()
        if key not in NAMED_CONFIGS:
            parser.error(f"unknown config {name!r}: choose from {', '.join(NAMED_CONFIGS)} "
                         f"(or pass a LlavaConfig JSON with --config-file)")
        entries.append((key, named_config(key), TYPICAL_IMAGE_TOKENS[key]))
    for path in args.config_file or []:
        from transformers import LlavaConfig

        try:
            cfg = LlavaConfig.from_json_file(path)
        except (OSError, ValueError) as exc:
            parser.error(f"--config-file {path}: cannot read a LlavaConfig JSON ({exc})")
        try:
            per_image = tokens_per_image(cfg)
        except AttributeError as exc:
            parser.error(f"--config-file {path}: not a LLaVA config with a vision tower ({exc})")
        entries.append((path, cfg, per_image))

    blocks = []
    for label, cfg, typical in entries:
        image_tokens = args.image_tokens if args.image_tokens is not None else typical
        try:
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
        f"  batch {rep.batch} x ({rep.image_tokens} image + {rep.text_tokens} text tokens), {rep.images // rep.batch} "
        f"image(s) of {rep.tokens_per_image} tokens per sample, {n} layers, {f} fusion layer(s), "
        f"KV {rep.dtype_bytes} B/elem",
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


# ------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dpvr-kernels`` (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="dpvr-kernels",
        description="DPVR-LF for Hugging Face LLaVA: image tokens leave the decoder at a route layer for a "
                    "one-layer side branch and are fused back at the last layer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="stock vs DPVR-LF on a random-weight LLaVA: speed, FLOPs, KV cache, numerics",
                       description="Build a LLaVA with random weights, time stock and DPVR-LF prefill and decode, "
                                   "compare with the cost model's ideal speedups, check numerics against the "
                                   "reference forward, and print one table. Exit code 1 if numerics FAIL.")
    _add_common(p, "Default: cpu on CPU, 7b on CUDA.")
    p.add_argument("--batch", type=_positive_int, default=None, help="prompts (default 4 on CPU, 8 on CUDA)")
    p.add_argument("--text-tokens", type=_positive_int, default=None,
                   help="text tokens of the longest prompt (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--images", type=_positive_int, default=1, help="images per prompt (default 1)")
    p.add_argument("--pad", type=_nonneg_int, default=None,
                   help="left padding of the shortest prompt; prompts in between get less (default text-tokens/4)")
    p.add_argument("--route-layer", type=int, default=None, help="route layer (default round(N*18/32))")
    p.add_argument("--fusion-layers", type=_positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--steps", type=_positive_int, default=None, help="greedy decode steps (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed prefill runs, the median is reported (default 3 on CPU, 5 on CUDA)")
    p.add_argument("--warmup", type=_nonneg_int, default=None, help="untimed prefill runs first (default 1 on CUDA and for tiny, else 0: the median absorbs a slow "
                        "first run)")
    p.add_argument("--backend", choices=_BACKENDS, default="auto", help="route_split/fuse_merge kernels (default auto)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.set_defaults(func=_cmd_demo, parser=p)

    p = sub.add_parser("bench", help="prefill speedup vs image tokens and batch size; CSV + PNG",
                       description="Sweep image tokens per sample (whole images of the model's size) and batch "
                                   "sizes; time stock and DPVR-LF prefill (median), report measured and ideal "
                                   "speedup; write OUT/bench.csv and OUT/bench.png.")
    _add_common(p, "Default: cpu on CPU, 7b on CUDA.")
    p.add_argument("--image-tokens", type=_int_list, default=None,
                   help="comma-separated image tokens per sample, multiples of the tokens per image "
                        "(default 144,576,2880: 1/4/20 images of 144 tokens for --size cpu, 9/36/180 of 16 for tiny; "
                        "576,2880 for 7b)")
    p.add_argument("--batches", type=_int_list, default=None, help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--text-tokens", type=_positive_int, default=None, help="text tokens (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--route-layer", type=int, default=None, help="route layer (default round(N*18/32))")
    p.add_argument("--fusion-layers", type=_positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timed runs per point (default 3 on CPU, 5 on CUDA)")
    p.add_argument("--warmup", type=_nonneg_int, default=None, help="untimed runs per point first (default 1)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench, parser=p)

    p = sub.add_parser("analyze", help="text-to-image attention share per layer and the route layer it suggests",
                       description="The paper's saturation profile: per decoder layer, the share of the text "
                                   "tokens' attention that goes to image tokens, from a stock eager-attention "
                                   "forward; prints a table, writes OUT/analyze.png and OUT/analyze.csv, and "
                                   "suggests a route layer. With random weights (default) the profile is not "
                                   "meaningful; --model-path loads a local trained checkpoint.")
    _add_common(p, "Default: cpu on CPU, 7b on CUDA.")
    p.add_argument("--model-path", default=None, help="local LLaVA checkpoint directory (no download) instead of --size")
    p.add_argument("--batch", type=_positive_int, default=2, help="prompts (default 2)")
    p.add_argument("--text-tokens", type=_positive_int, default=32, help="text tokens (default 32)")
    p.add_argument("--images", type=_positive_int, default=1, help="images per prompt (default 1)")
    p.add_argument("--fraction", type=_fraction, default=0.1,
                   help="route where the share stays <= FRACTION x its layer-0 value (default 0.1)")
    p.add_argument("--fusion-layers", type=_positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--out", default="analyze_out", help="output directory (default analyze_out/)")
    p.set_defaults(func=_cmd_analyze, parser=p)

    p = sub.add_parser("flops", help="parameters, prefill FLOPs and KV bytes per route layer (cost model)",
                       description="Exact cost model (no model is built): parameters, trainable share and, per "
                                   "route layer, prefill FLOPs, ideal speedups and KV-cache bytes. With "
                                   "--route-layer, the full report for that layer.")
    p.add_argument("--config", action="append", default=None, metavar="NAME",
                   help=f"named config, repeatable: {', '.join(NAMED_CONFIGS)} (default: all, unless --config-file)")
    p.add_argument("--config-file", action="append", default=None, metavar="PATH",
                   help="a LlavaConfig JSON (config.json of a checkpoint), repeatable")
    p.add_argument("--image-tokens", type=_nonneg_int, default=None,
                   help="image tokens per sample (default: typical per config: "
                        + ", ".join(f"{k} {v}" for k, v in TYPICAL_IMAGE_TOKENS.items())
                        + "; one image for --config-file)")
    p.add_argument("--text-tokens", type=_nonneg_int, default=64, help="text tokens per sample (default 64)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--route-layer", type=int, default=None, help="print the full report for this route layer")
    p.add_argument("--fusion-layers", type=_positive_int, default=1, help="fusion layers (default 1)")
    p.add_argument("--dtype-bytes", type=_positive_int, default=2, help="bytes per KV element (default 2: fp16/bf16)")
    p.set_defaults(func=_cmd_flops, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpvr-kernels`` and ``python -m dpvr_kernels``; returns the exit code.

    Bad arguments raise ``SystemExit(2)`` with a message (argparse's ``parser.error``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    wanted = getattr(args, "threads", None)
    if wanted is None and hasattr(args, "threads"):
        wanted = default_threads(getattr(args, "size", None))
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        return int(args.func(args, args.parser))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
