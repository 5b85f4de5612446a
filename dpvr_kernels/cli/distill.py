"""``dpvr-kernels distill``: train the DPVR-LF side branch of your model on LLaVA conversation data.

The teacher is the model's own stock forward (no second copy); the loss is KL(stock || DPVR-LF) on the answer
tokens (``--lm-weight`` adds the LM loss on them); only the side branch trains (``--train-fusion`` adds the
fusion layers). Built on the Hugging Face ``Trainer``: run it under ``torchrun --nproc_per_node N -m
dpvr_kernels distill ...`` or ``accelerate launch`` for DDP; ``--grad-accum``, ``--bf16``, ``--save-steps`` and
``--resume`` are the Trainer's. The output folder loads with ``from_pretrained`` + ``dpvr_kernels.patch``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import log, nonneg_int, positive_int


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``distill`` on the subparsers ``sub``."""
    p = sub.add_parser("distill", allow_abbrev=False,
                       help="train the side branch (KL to the model's own stock forward) on LLaVA conversation data",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the model folder (save_pretrained model + processor), or demo")
    p.add_argument("--data", required=True, metavar="FILE",
                   help='LLaVA conversation records, a JSON list or JSONL: {"image": "a.png", "conversations": '
                        '[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}')
    p.add_argument("--image-folder", required=True, metavar="DIR", help="folder the records' image paths are under")
    p.add_argument("--route-layer", required=True, type=nonneg_int, metavar="R", help="route layer to distil")
    p.add_argument("--fusion-layers", type=positive_int, default=1, metavar="F", help="fusion layers (default 1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (the distilled model; Trainer checkpoints in DIR/checkpoints)")
    p.add_argument("--side-branch-only", action="store_true",
                   help="write only the trained tensors and settings (dpvr_side_branch.*), for the base folder; "
                        "apply with dpvr_kernels.load_side_branch(model, DIR)")
    p.add_argument("--train-fusion", action="store_true", help="also train the fusion layer(s)")
    p.add_argument("--lm-weight", type=_nonneg_float, default=0.0,
                   help="weight of the LM loss on the answer tokens, added to the KL (default 0)")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="records per device and step (default 8)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="peak AdamW learning rate, cosine (default 1e-4)")
    p.add_argument("--warmup", type=_nonneg_float, default=0.05,
                   help="warmup: steps, or a fraction of the steps if < 1 (default 0.05)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the Trainer's)")
    p.add_argument("--save-steps", type=positive_int, default=None,
                   help="write a checkpoint every N steps to OUT/checkpoints (trained tensors, optimizer, RNG)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    p.add_argument("--eval-data", metavar="FILE", default=None,
                   help="held-out records: mean answer-token KL before and after (same format)")
    p.add_argument("--eval-image-folder", metavar="DIR", default=None,
                   help="folder the --eval-data images are relative to (default: --image-folder)")
    p.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.set_defaults(func=run, parser=p)
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dpvr-kernels distill``; returns the exit code."""
    try:
        import accelerate  # noqa: F401  (the Trainer's dependency)
    except ImportError:
        parser.error("distill trains with the Hugging Face Trainer, which needs accelerate: "
                     "pip install 'dpvr-kernels[train]' (or pip install accelerate)")
    from ..assets import resolve_model_name
    from ..config import validate_route
    from ..conversations import DataError
    from ..distill import distill

    try:
        model_dir = resolve_model_name(args.model)
    except FileNotFoundError as exc:
        parser.error(f"--model {args.model}: {exc}")
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        parser.error(f"--model {args.model}: no config.json there; pass a folder written by save_pretrained (model "
                     "and processor)")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag} {path}: no such file; pass a JSON or JSONL file of LLaVA conversation records")
    for flag, folder in (("--image-folder", args.image_folder), ("--eval-image-folder", args.eval_image_folder)):
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"{flag} {folder}: no such folder")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    layers = getattr(getattr(config, "text_config", config), "num_hidden_layers", None)
    if layers is not None:
        try:
            validate_route(layers, args.route_layer, args.fusion_layers)
        except ValueError as exc:
            parser.error(str(exc))
    log(f"distill: {args.model} at route layer {args.route_layer} (fusion {args.fusion_layers}) on {args.data}")
    try:
        result = distill(model_dir, args.data, args.image_folder, args.out, args.route_layer, args.fusion_layers,
                         train_fusion=args.train_fusion, lm_weight=args.lm_weight, temperature=args.temperature,
                         max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, bf16=args.bf16,
                         save_steps=args.save_steps, resume=args.resume, side_branch_only=args.side_branch_only,
                         seed=args.seed, logging_steps=args.logging_steps, eval_data=args.eval_data,
                         eval_image_folder=args.eval_image_folder,
                         progress=not args.no_progress)
    except (DataError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(f"distilled route layer {args.route_layer}: {result.steps} steps in {result.seconds:.1f} s, "
          f"{result.trainable:,} trainable parameters ({result.trainable_percent:.2f} % of the stock model), "
          f"train loss {result.train_loss:.4g}")
    if result.held_out_kl_after is not None:
        before = f"{result.held_out_kl_before:.4g} -> " if result.held_out_kl_before is not None else ""
        print(f"held-out KL(stock || DPVR-LF) per answer token: {before}{result.held_out_kl_after:.4g}")
    print(f"wrote {result.out}" + (" (side branch only)" if args.side_branch_only else ""))
    return 0
