"""The ``dpvr-kernels`` command line: ``demo``, ``bench``, ``analyze``, ``flops``, ``distill`` and ``eval``, one
module each.

* ``demo`` (:mod:`.demo`): stock vs DPVR-LF on your checkpoint (``--model DIR --image FILE --prompt TEXT``) or
  a random-weight LLaVA: answers, prefill and decode timings next to the cost model's ideal, KV-cache bytes,
  the numerics check against :func:`dpvr_kernels.reference.reference_forward`, and which kernels ran.
* ``bench`` (:mod:`.bench`): prefill speedup (measured and ideal) over image-token counts and batch sizes;
  CSV + PNG.
* ``analyze`` (:mod:`.analyze`): the paper's saturation profile (text-to-image attention share per layer)
  and the route layer it suggests; table + PNG.
* ``flops`` (:mod:`.flops`): parameters, FLOPs and KV bytes per route layer for named configs or config
  files.
* ``distill`` (:mod:`.distill`): train the side branch on LLaVA conversation data (KL to the model's own stock
  forward, Hugging Face ``Trainer``).
* ``eval`` (:mod:`.eval`): stock vs DPVR-LF per route layer: accuracy per question type, agreement, answer KL,
  FLOPs saved, throughput; table, JSON and plot.

``--model demo`` and ``--model demo-dpvr`` name the digit-reading model that ships in the package.

Shared helpers live in :mod:`.common`. Every subcommand has ``--help``; bad arguments exit with code 2 and
a message that names the fix. Progress and warnings go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse

import torch

from . import analyze, bench, demo, distill, flops
from . import eval as eval_cmd
from .common import default_threads

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dpvr-kernels`` (one subparser per command, no prefix abbreviations)."""
    parser = argparse.ArgumentParser(
        prog="dpvr-kernels",
        allow_abbrev=False,
        description="DPVR-LF for Hugging Face LLaVA: image tokens leave the decoder at a route layer for a "
                    "one-layer side branch and are fused back at the last layer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (demo, bench, analyze, flops, distill, eval_cmd):
        command.add_parser(sub)
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
