"""Does DPVR-LF keep the answers? Accuracy, agreement with stock and KL on answer tokens, per route layer.

:func:`evaluate` runs a model's stock forward and its DPVR-LF forward (route layers of your choice) on
conversation data (:mod:`dpvr_kernels.conversations`) and reports, per route layer: greedy answers' exact-match
accuracy per question type (where records have a ``type``), agreement with stock's answer, the mean
``KL(stock || DPVR-LF)`` on the answer tokens, the prefill FLOPs saved (cost model) and throughput.
``dpvr-kernels eval`` is its command line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .conversations import Example, collate, encode
from .training import answer_kl

__all__ = [
    "EvalResult",
    "answer_matches",
    "encode_grid_items",
    "evaluate",
    "flops_saved",
    "grid_accuracy",
    "greedy_answers",
    "normalize_answer",
    "score",
]


def normalize_answer(text: str) -> str:
    """Exact match ignores case, surrounding whitespace, runs of spaces and a final period."""
    return " ".join(text.strip().lower().split()).removesuffix(".").strip()


def _model_kwargs(batch: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()
            if k != "labels"}


@torch.no_grad()
def answer_matches(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Teacher-forced exact match ``[B]``: every answer token is the argmax after its prefix. For a greedy
    decoder this is the same as "greedy generation reproduces the answer and its end token", at one forward."""
    kwargs = _model_kwargs(batch, model.device, model.dtype)
    logits = model(**kwargs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(logits.device)
    answer = labels != -100
    right = (logits.argmax(-1) == labels) | ~answer
    return right.all(-1)


def grid_records(items: Sequence[Any]) -> list[dict[str, Any]]:
    """Digit-grid items (:mod:`dpvr_kernels.digit_grids`) as conversation records (images kept in memory)."""
    return [{"id": i, "type": it.type, "conversations": [{"from": "human", "value": f"<image>\n{it.question}"},
                                                          {"from": "gpt", "value": it.answer}]}
            for i, it in enumerate(items)]


def encode_grid_items(processor: Any, items: Sequence[Any], shuffle_images: bool = False) -> list[Example]:
    """Encode digit-grid items through the processor; ``shuffle_images`` pairs each question with the next
    item's grid (the control that shows a model reads the image)."""
    from PIL import Image

    from .digit_grids import render_grid

    records = grid_records(items)
    examples = []
    for i, (record, item) in enumerate(zip(records, items, strict=True)):
        source = items[(i + 1) % len(items)] if shuffle_images else item
        image = Image.fromarray(render_grid(source.split, source.sources)).convert("RGB")
        records[i]["image"] = "grid.png"
        examples.append(encode(processor, record, [image], i))
    return examples


def _batches(examples: Sequence[Example], size: int) -> list[list[Example]]:
    return [list(examples[i:i + size]) for i in range(0, len(examples), size)]


def _by_type(examples: Sequence[Example], correct: Sequence[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for e, ok in zip(examples, correct, strict=True):
        groups.setdefault(e.type or "all", []).append(bool(ok))
    out = {k: sum(v) / len(v) for k, v in groups.items()}
    out["overall"] = sum(map(bool, correct)) / len(correct)
    return out


@torch.no_grad()
def grid_accuracy(model: nn.Module, processor: Any, items: Sequence[Any], batch: int = 100,
                  shuffle_images: bool = False) -> dict[str, float]:
    """Exact-match accuracy per question type and overall on digit-grid items (teacher-forced greedy match)."""
    examples = encode_grid_items(processor, items, shuffle_images)
    pad = processor.tokenizer.pad_token_id
    correct: list[bool] = []
    for chunk in _batches(examples, batch):
        correct += answer_matches(model, collate(chunk, pad)).tolist()
    return _by_type(examples, correct)


@torch.no_grad()
def greedy_answers(model: nn.Module, processor: Any, examples: Sequence[Example], batch: int = 16,
                   max_new_tokens: int = 16) -> tuple[list[str], float]:
    """Greedy ``generate`` on each example's first prompt (left-padded batches). Returns the decoded answers
    and the seconds generation took."""
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = model.config
    suppress = [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                if i is not None]
    answers: list[str] = []
    seconds = 0.0
    for chunk in _batches(examples, batch):
        prompts = [Example(e.input_ids[:e.prompt_length], e.labels[:e.prompt_length], e.vision) for e in chunk]
        inputs = _model_kwargs(collate(prompts, pad, padding_side="left"), model.device, model.dtype)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, suppress_tokens=suppress or None)
        seconds += time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers, seconds


@dataclass
class EvalResult:
    """One row of :func:`evaluate`: stock (``route_layer`` None) or DPVR-LF at one route layer."""

    route_layer: int | None
    fusion_layers: int | None
    accuracy: dict[str, float] | None
    """Exact match per type and ``overall``; None when the data has no reference answers to score."""
    agreement: float | None
    """Share of answers equal to stock's (None for the stock row)."""
    answer_kl: float | None
    """Mean KL(stock || DPVR-LF) per answer token (None for the stock row)."""
    flops_saved: float
    """Share of the stock prefill FLOPs DPVR-LF saves on this data (cost model; 0 for stock)."""
    samples_per_s: float
    answers: list[str] = field(default_factory=list)

    def as_dict(self, with_answers: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "answers"}
        if with_answers:
            out["answers"] = self.answers
        return out


def score(answers: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Exact-match accuracy (after :func:`normalize_answer`) per type and overall."""
    return _by_type(examples, [normalize_answer(a) == normalize_answer(e.answer) for a, e in zip(answers, examples,
                                                                                                    strict=True)])


def flops_saved(config: Any, examples: Sequence[Example], route_layer: int, fusion_layers: int = 1) -> float:
    """Share of the stock prefill FLOPs that DPVR-LF saves on the examples' prompts (cost model, summed)."""
    from .flops import cost_model

    ids = [config.image_token_id] + ([config.video_token_id] if getattr(config, "video_token_id", None) else [])
    stock = dpvr = 0.0
    for e in examples:
        prompt = e.input_ids[:e.prompt_length]
        vision = int(sum(int((prompt == i).sum()) for i in ids))
        report = cost_model(config, vision, len(prompt) - vision, 1, route_layer, fusion_layers)
        stock += report.flops_stock
        dpvr += report.flops_dpvr
    return 1.0 - dpvr / stock


@torch.no_grad()
def _stock_logits(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> list[Tensor]:
    return [model(**_model_kwargs(b, model.device, model.dtype), use_cache=False).logits.float().cpu()
            for b in batches]


def evaluate(model: nn.Module, processor: Any, examples: Sequence[Example], route_layers: Sequence[int],
             fusion_layers: int = 1, batch: int = 16, max_new_tokens: int = 16,
             progress: Callable[[str], None] | None = None) -> list[EvalResult]:
    """Stock, then DPVR-LF at each route layer, on the same examples. The model is left as it came (stock or
    patched with its own settings). A patched model's own side branch is kept (a distilled one is evaluated);
    an unpatched model gets a fresh side branch (a copy of the route layer: "untrained")."""
    from .models.patching import is_patched, patch, stock_forward, unpatch

    scored = all(e.answer for e in examples)
    pad = processor.tokenizer.pad_token_id
    batches = [collate(chunk, pad) for chunk in _batches(examples, batch)]
    original = dict(model.config.dpvr) if is_patched(model) else None
    rows = []
    with stock_forward(model):
        if progress:
            progress("stock: answers")
        stock_answers, seconds = greedy_answers(model, processor, examples, batch, max_new_tokens)
        stock_logits = _stock_logits(model, batches)
    rows.append(EvalResult(None, None, score(stock_answers, examples) if scored else None, None, None, 0.0,
                           len(examples) / seconds, stock_answers))
    try:
        for r in route_layers:
            if original is not None and original["route_layer"] != r:
                raise ValueError(f"the model is patched at route layer {original['route_layer']} (its own side "
                                 f"branch); evaluate it there, or unpatch it to try other route layers")
            if original is None:
                patch(model, route_layer=r, fusion_layers=fusion_layers)
            f = int(model.config.dpvr["fusion_layers"])
            if progress:
                progress(f"DPVR-LF route layer {r}: answers")
            answers, seconds = greedy_answers(model, processor, examples, batch, max_new_tokens)
            kl_sum = tokens = 0.0
            with torch.no_grad():
                for b, teacher in zip(batches, stock_logits, strict=True):
                    student = model(**_model_kwargs(b, model.device, model.dtype), use_cache=False).logits
                    kl_sum += float(answer_kl(student.float().cpu(), teacher, b["labels"]).sum())
                    tokens += int((b["labels"][:, 1:] != -100).sum())
            agree = sum(normalize_answer(a) == normalize_answer(s) for a, s in zip(answers, stock_answers,
                                                                                   strict=True))
            rows.append(EvalResult(r, f, score(answers, examples) if scored else None, agree / len(examples),
                                   kl_sum / max(tokens, 1), flops_saved(model.config, examples, r, f),
                                   len(examples) / seconds if seconds else math.nan, answers))
            if original is None:
                unpatch(model)
    finally:
        if original is None and is_patched(model):
            unpatch(model)
    return rows
