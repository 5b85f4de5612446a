"""Does DPVR-LF keep the answers? The quality study behind the README's table, on the shipped demo model.

    python scripts/quality_study.py                      # ~45 min on 2 CPU cores; add --ship to write demo-dpvr

On 1,000 held-out digit grids (the test split, ``sample_items(1000, "test", seed=2026)``), for every route layer
r in 1..N-2: stock accuracy; DPVR-LF with an untrained side branch (a copy of layer r); DPVR-LF with the side
branch distilled (``dpvr_kernels.distill``: KL to the model's own stock forward on the answer tokens, side branch
only); the same with the fusion layer trainable; and the prefill FLOPs saved (cost model). Per question type.
Then, at the default route layer, what else was tried (longer distillation, an LM loss, fusion_layers=2); the
paper's saturation analysis (text-to-image attention share per layer and the route layer it suggests); and the
controls (chance per question type, accuracy with shuffled images).

The distillation data are 20,000 grids of training digits in LLaVA's conversation format (written under
``--work``), the same files ``dpvr-kernels distill`` reads. Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.
``--ship`` saves the recommended model (the most prefill FLOPs saved at a loss of at most 2 points; then the
fewest trained parameters) as the package's ``demo-dpvr`` folder. ``--render-only`` rewrites the reports from
``OUT.json`` (with ``--ship``, ships again from the runs under ``--work``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import dpvr_kernels
from dpvr_kernels import digit_grids as grids
from dpvr_kernels.analysis import attention_to_image_profile, suggest_route_layer
from dpvr_kernels.config import default_route_layer
from dpvr_kernels.conversations import collate, encode, load_records, read_images
from dpvr_kernels.distill import distill, load_side_branch
from dpvr_kernels.evaluation import encode_grid_items, evaluate, greedy_answers, score

HELD_OUT_SEED, TRAIN_SEED, VALID_SEED = 2026, 11, 12


def load(model_dir: str):
    return AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()


def write_data(work: Path, n_train: int, n_test: int) -> dict[str, Path]:
    paths = {"train": work / "train" / "data.json", "valid": work / "valid" / "data.json",
             "test": work / "test" / "data.json"}
    if not all(p.is_file() for p in paths.values()):
        grids.write_conversations(grids.sample_items(n_train, "train", seed=TRAIN_SEED), work / "train")
        grids.write_conversations(grids.sample_items(200, "train", seed=VALID_SEED), work / "valid")
        grids.write_conversations(grids.sample_items(n_test, "test", seed=HELD_OUT_SEED), work / "test")
    return paths


def row_dict(row, variant: str, trainable: int | None = None, seconds: float | None = None,
             steps: int | None = None) -> dict:
    return {"variant": variant, **row.as_dict(), "trainable": trainable, "distill_seconds": seconds,
            "distill_steps": steps}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def render_markdown(results: dict, total_params: int) -> str:
    """The README's quality tables from the study's JSON."""
    types = list(grids.QUESTION_TYPES)
    stock = results["stock"]["accuracy"]
    head = ("| r | FLOPs saved | variant | trained params | overall | " + " | ".join(types)
            + " | agrees with stock | KL/answer token |")
    lines = [f"Held-out: {results['held_out']['n']} grids of test-split digits (seed {results['held_out']['seed']}); "
             f"accuracy in %, exact match on greedy answers. Distillation: {results['distill']['steps']} steps x "
             f"batch {results['distill']['batch']}, lr {results['distill']['lr']}, on "
             f"{results['distill']['train_grids']:,} training grids; {results['machine']}.", "",
             head, "|" + "---|" * (head.count("|") - 1),
             f"| - | 0 % | stock | - | {_pct(stock['overall'])} | " + " | ".join(_pct(stock[t]) for t in types)
             + " | - | - |"]
    main = [r for r in results["rows"] if r.get("fusion_layers", 1) in (1, None)
            and r["variant"] in ("untrained", "distilled", "distilled + fusion layer")]
    extras = [r for r in results["rows"] if r not in main]

    def row_line(r: dict) -> str:
        trained = "-" if not r.get("trainable") else f"{r['trainable']:,} ({100 * r['trainable'] / total_params:.1f} %)"
        name = r["variant"] + (f", f={r['fusion_layers']}" if (r.get("fusion_layers") or 1) != 1 else "")
        kl = "" if r["answer_kl"] is None else f"{r['answer_kl']:.4f}"
        return (f"| {r['route_layer']} | {100 * r['flops_saved']:.1f} % | {name} | {trained} | "
                f"**{_pct(r['accuracy']['overall'])}** | " + " | ".join(_pct(r["accuracy"][t]) for t in types)
                + f" | {_pct(r['agreement'])} | {kl} |")

    lines += [row_line(r) for r in sorted(main, key=lambda r: (r["route_layer"], r["variant"] != "untrained",
                                                                r["variant"]))]
    if extras:
        lines += ["", f"Also tried at route layer {results['default_route_layer']}:", "", head,
                  "|" + "---|" * (head.count("|") - 1)]
        lines += [row_line(r) for r in extras]
    c = results["controls"]
    lines += ["", "Controls (same held-out grids):", "",
              "| | overall | " + " | ".join(types) + " |", "|---|" + "---|" * (len(types) + 1),
              "| chance: always the most common answer | " + _pct(c["chance"]["overall"]["majority"]) + " | "
              + " | ".join(_pct(c["chance"][t]["majority"]) for t in types) + " |",
              "| chance: an answer drawn from the answer distribution | " + _pct(c["chance"]["overall"]["prior"])
              + " | " + " | ".join(_pct(c["chance"][t]["prior"]) for t in types) + " |",
              "| stock model, each grid's image swapped for another grid's | "
              + _pct(c["shuffled_images"]["overall"]) + " | "
              + " | ".join(_pct(c["shuffled_images"][t]) for t in types) + " |"]
    sat = results["saturation"]
    lines += ["", f"Saturation (`analyze`): share of text-query attention on image keys per layer, mean over "
              f"{sat['prompts']} held-out prompts: " + ", ".join(f"L{i} {v:.2f}" for i, v in enumerate(sat["profile"]))
              + f". Suggested route layer (share <= {sat['fraction']} x layer 0's through the deep layers): "
              f"{sat['suggested_route_layer']}."]
    best = results.get("recommended")
    if best:
        lines += ["", "Recommended (the most FLOPs saved at a loss of at most 2 points, then the fewest trained "
                  f"parameters): route layer {best['route_layer']}, fusion layers {best['fusion_layers']}, {best['variant']}: "
                  f"{_pct(best['accuracy']['overall'])} % vs stock {_pct(stock['overall'])} %, "
                  f"{100 * best['flops_saved']:.1f} % of prefill FLOPs saved."]
    return "\n".join(lines) + "\n"


def render_plot(results: dict, path: str) -> None:
    """Overall accuracy against prefill FLOPs saved, one line per variant, stock as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for variant, marker in (("untrained", "x"), ("distilled", "o"), ("distilled + fusion layer", "s")):
        rows = sorted((r for r in results["rows"] if r["variant"] == variant and r.get("fusion_layers", 1) in (1, None)),
                      key=lambda r: r["flops_saved"])
        ax.plot([100 * r["flops_saved"] for r in rows], [100 * r["accuracy"]["overall"] for r in rows],
                marker=marker, label=f"DPVR-LF, {variant}")
        if variant == "distilled":
            for r in rows:
                ax.annotate(f"r={r['route_layer']}", (100 * r["flops_saved"], 100 * r["accuracy"]["overall"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.axhline(100 * results["stock"]["accuracy"]["overall"], color="gray", linestyle="--", label="stock")
    ax.axhline(100 * results["controls"]["shuffled_images"]["overall"], color="red", linestyle=":",
               label="stock, shuffled images")
    ax.set_xlabel("prefill FLOPs saved (%)")
    ax.set_ylabel("held-out exact-match accuracy (%)")
    ax.set_title(f"demo model, {results['held_out']['n']} held-out digit grids", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_reports(results: dict, out: str, model_dir: str) -> None:
    total = sum(p.numel() for p in load(model_dir).parameters())
    Path(out + ".md").write_text(render_markdown(results, total))
    render_plot(results, out + ".png")


def recommend(results: dict) -> dict | None:
    """The distilled row that saves the most prefill FLOPs at a loss of at most 2 points; among those, the one
    that trains the fewest parameters (the side branch alone keeps the stock weights, so unpatching gives the
    original model back), then the most accurate."""
    stock_acc = results["stock"]["accuracy"]["overall"]
    ok = [row for row in results["rows"] if row["variant"] != "untrained"
          and row["accuracy"]["overall"] >= stock_acc - 0.02]
    return max(ok, key=lambda row: (row["flops_saved"], -row["trainable"], row["accuracy"]["overall"]),
               default=None)


def ship(results: dict, model_dir: str, processor) -> Path:
    """Write the recommended row's model as the package's ``demo-dpvr`` folder."""
    best = results["recommended"]
    target = Path(dpvr_kernels.__file__).parent / "data" / "demo-dpvr"
    if target.exists():
        shutil.rmtree(target)
    student = load_side_branch(load(model_dir), best["side_branch_dir"])
    student.save_pretrained(target)
    processor.save_pretrained(target)
    settings = {"route_layer": best["route_layer"], "fusion_layers": best["fusion_layers"],
                "train_fusion": "fusion layer" in best["variant"], "variant": best["variant"],
                "base_model": "demo", **results["distill"]}
    info = {"settings": settings, "result": {"held_out_accuracy": best["accuracy"],
                                             "stock_accuracy": results["stock"]["accuracy"]}}
    (target / "distill.json").write_text(json.dumps(info, indent=1) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="stock model folder (default: the shipped demo model)")
    p.add_argument("--work", default="/tmp/dpvr_quality", help="data and distilled side branches")
    p.add_argument("--out", default="benchmarks/results/quality_cpu")
    p.add_argument("--steps", type=int, default=400, help="distillation steps per run (batch 32)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train", type=int, default=20000, help="distillation grids")
    p.add_argument("--test", type=int, default=1000, help="held-out grids")
    p.add_argument("--route-layers", default=None, help="comma-separated (default 1..N-2)")
    p.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                   help="the other things tried at the default route layer")
    p.add_argument("--ship", action="store_true", help="write the recommended model to dpvr_kernels/data/demo-dpvr")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render-only", action="store_true", help="rewrite OUT.md and OUT.png from OUT.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or dpvr_kernels.demo_model()
    if args.render_only:  # and, with --ship, ship the recommendation again (the runs under --work must exist)
        results = json.loads(Path(args.out + ".json").read_text())
        results["recommended"] = recommend(results)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
        write_reports(results, args.out, model_dir)
        if args.ship and results["recommended"] is not None:
            print(f"wrote {ship(results, model_dir, AutoProcessor.from_pretrained(model_dir, local_files_only=True))}")
        return 0
    work = Path(args.work)
    data = write_data(work, args.train, args.test)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    records = load_records(data["test"])
    examples = [encode(processor, r, read_images(i, r, data["test"].parent), i) for i, r in enumerate(records)]
    n_layers = load(model_dir).config.text_config.num_hidden_layers
    layers = ([int(x) for x in args.route_layers.split(",")] if args.route_layers else list(range(1, n_layers - 1)))
    default_r = default_route_layer(n_layers, 1)
    results: dict = {"model": model_dir, "held_out": {"n": len(examples), "seed": HELD_OUT_SEED},
                     "distill": {"steps": args.steps, "batch": 32, "lr": args.lr, "train_grids": args.train},
                     "machine": f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}",
                     "default_route_layer": default_r, "rows": []}
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    # --- stock and untrained side branches, every route layer
    model = load(model_dir)
    rows = evaluate(model, processor, examples, layers, batch=100, max_new_tokens=4)
    results["stock"] = rows[0].as_dict()
    results["rows"] += [row_dict(r, "untrained") for r in rows[1:]]
    log(f"stock {rows[0].accuracy['overall']:.3f}; untrained " +
        " ".join(f"r{r.route_layer}={r.accuracy['overall']:.3f}" for r in rows[1:]))

    # --- controls: chance per type, shuffled images
    items = grids.sample_items(args.test, "test", seed=HELD_OUT_SEED)
    shuffled = encode_grid_items(processor, items, shuffle_images=True)
    answers, _ = greedy_answers(model, processor, shuffled, batch=100, max_new_tokens=4)
    results["controls"] = {"chance": grids.chance_levels(items), "shuffled_images": score(answers, examples)}
    log(f"shuffled images {results['controls']['shuffled_images']['overall']:.3f}")

    # --- the paper's saturation analysis
    prompts = [e for e in examples[:200]]
    batch = collate([type(e)(e.input_ids[:e.prompt_length], e.labels[:e.prompt_length], e.vision) for e in prompts],
                    processor.tokenizer.pad_token_id, padding_side="left")
    profile = attention_to_image_profile(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    suggested = suggest_route_layer(profile, 0.1, 1)
    results["saturation"] = {"profile": profile, "suggested_route_layer": suggested, "fraction": 0.1,
                             "prompts": len(prompts)}
    log(f"saturation profile {[round(x, 3) for x in profile]} -> suggested route layer {suggested}")

    # --- distilled side branches
    def distilled_row(r: int, variant: str, fusion_layers: int = 1, steps: int | None = None, **kw) -> dict:
        out = work / "runs" / f"r{r}_f{fusion_layers}_{variant.replace(' ', '_').replace(',', '')}"
        res = distill(model_dir, data["train"], data["train"].parent, out, r, fusion_layers, max_steps=steps or args.steps,
                      batch_size=32, lr=args.lr, side_branch_only=True, eval_data=data["valid"],
                      eval_image_folder=data["valid"].parent, progress=False,
                      logging_steps=100, **kw)
        student = load_side_branch(load(model_dir), out)
        row = evaluate(student, processor, examples, [r], batch=100, max_new_tokens=4)[1]
        log(f"r={r} f={fusion_layers} {variant}: {row.accuracy['overall']:.3f} (valid KL {res.held_out_kl_before:.4f} -> "
            f"{res.held_out_kl_after:.4f}, {res.seconds:.0f} s)")
        entry = row_dict(row, variant, res.trainable, res.seconds, res.steps)
        entry.update({"fusion_layers": fusion_layers, "side_branch_dir": str(out),
                      "valid_kl_before": res.held_out_kl_before, "valid_kl_after": res.held_out_kl_after})
        return entry

    for r in layers:
        results["rows"].append(distilled_row(r, "distilled"))
        results["rows"].append(distilled_row(r, "distilled + fusion layer", train_fusion=True))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")

    if args.extras:
        r = default_r
        results["rows"].append(distilled_row(r, "distilled, 3x steps", steps=3 * args.steps))
        results["rows"].append(distilled_row(r, "distilled + LM loss", lm_weight=1.0))
        results["rows"].append(distilled_row(r, "distilled", fusion_layers=2))
        results["rows"].append(distilled_row(r, "distilled + fusion layer", fusion_layers=2, train_fusion=True))

    results["recommended"] = recommend(results)
    results["seconds"] = time.time() - started
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    write_reports(results, args.out, model_dir)
    best = results["recommended"]
    log(f"recommended: {None if best is None else (best['route_layer'], best['fusion_layers'], best['variant'])}")
    if args.ship and best is not None:
        log(f"wrote {ship(results, model_dir, processor)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
