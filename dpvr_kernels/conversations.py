"""LLaVA conversation data -> model inputs, through the model's own processor and chat template.

The format is LLaVA's (a JSON list, or JSON Lines, of records)::

    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                         {"from": "gpt", "value": "A cat."}]}

``image`` is a file under the image folder (or a list of files); each ``<image>`` placeholder in the human
turns stands for the next image, and their counts must match. Optional fields: ``id`` (named in errors and
reports) and ``type`` (a question type, for per-type accuracy in ``eval``).

A conversation is rendered with ``processor.apply_chat_template`` turn by turn: the text of each assistant
turn is what the template adds for it after the generation prompt, so the answer tokens are exactly those a
model generates after that prompt (``</s>`` included where the template puts it, else the tokenizer's EOS is
appended). Every problem with a record is a :class:`DataError` that names the record and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataError", "Example", "collate", "encode", "load_records", "read_images"]

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A record of a conversation file that cannot be used; the message names the record and the fix."""


@dataclass
class Example:
    """One encoded record: 1-D ``input_ids``, ``labels`` (answer tokens, -100 elsewhere) and vision tensors."""

    input_ids: Tensor
    labels: Tensor
    vision: dict[str, Tensor] = field(default_factory=dict)
    prompt_length: int = 0
    """Tokens before the first answer (the generation prompt of the first turn)."""
    answer: str = ""
    """The first assistant turn's text as written in the data (the reference answer)."""
    type: str | None = None
    id: Any = None


def _where(index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list or a JSON Lines file of conversation records, checking their structure.

    Raises:
        DataError: unreadable file, not JSON, or a record without an image/conversations of the right shape.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"--data {path}: cannot read it ({exc}); pass a JSON or JSONL file of LLaVA records") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {line_no}: not valid JSON ({exc}); a JSONL file holds one "
                                    "record per line") from exc
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: no records; expected a JSON list (or JSON Lines) of "
                        '{"image": ..., "conversations": [...]} records')
    for i, record in enumerate(records):
        _check_structure(i, record)
    return records


def _check_structure(index: int, record: Any) -> None:
    where = _where(index, record)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with 'image' and 'conversations', got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    answers = 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}, turn {t}: each turn needs 'from' (one of {sorted(_ROLES)}) and a string "
                            f"'value'; got {turn!r}")
        if _ROLES[turn["from"]] == "assistant":
            answers += 1
            if not turn["value"].strip():
                raise DataError(f"{where}, turn {t}: empty answer; give the gpt turn the reference text, or drop "
                                "the record")
    if answers == 0:
        raise DataError(f"{where}: no 'gpt' turn, so nothing to learn or score; add the answer turn")
    images = record.get("image")
    names = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: 'image' must be a file name or a list of file names, got {images!r}")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(names):
        have = f"{len(names)} image(s)" if names else "no 'image'"
        raise DataError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {have}; each image needs "
                        f"one {IMAGE_PLACEHOLDER} in a human turn (and each placeholder an image)")


def image_names(record: dict[str, Any]) -> list[str]:
    images = record.get("image")
    return [] if images is None else [images] if isinstance(images, str) else list(images)


def read_images(index: int, record: dict[str, Any], image_folder: str | Path) -> list[Any]:
    """The record's images as RGB PIL images. Raises :class:`DataError` for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for name in image_names(record):
        path = Path(image_folder) / name
        if not path.is_file():
            raise DataError(f"{_where(index, record)}: image file {path} not found; check --image-folder and the "
                            "record's 'image'")
        try:
            with Image.open(path) as img:
                out.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{_where(index, record)}: image file {path} is not an image PIL can read ({exc}); "
                            "replace it or drop the record") from exc
    return out


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    messages = []
    for turn in record["conversations"]:
        role = _ROLES[turn["from"]]
        parts = turn["value"].split(IMAGE_PLACEHOLDER)
        content: list[dict[str, str]] = []
        for k, part in enumerate(parts):
            if k:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        messages.append({"role": role, "content": content})
    return messages


def _render(processor: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _pieces(processor: Any, messages: list[dict[str, Any]], where: str) -> list[tuple[str, bool]]:
    """``(text, is_answer)`` pieces whose concatenation is the rendered conversation."""
    if not getattr(processor, "chat_template", None):
        raise DataError(f"{where}: the processor has no chat template; save one with the processor "
                        "(processor.chat_template = ...; processor.save_pretrained(DIR))")
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(processor, messages[:i], True)
        full = _render(processor, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (turn {i}'s "
                            "text does not extend the previous one); use a template that appends each turn")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, answer) for text, answer in pieces if text]


def encode(processor: Any, record: dict[str, Any], images: Sequence[Any], index: int = 0) -> Example:
    """Tokenize one record (its images already read) into an :class:`Example`.

    Each piece of the rendered conversation goes through the processor on its own (the pieces with image
    placeholders with their images), so the prompt tokens are exactly those ``generate`` sees and the answer
    tokens exactly those it should produce.
    """
    where = _where(index, record)
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    ids: list[int] = []
    labels: list[int] = []
    vision: dict[str, list[Tensor]] = {}
    remaining = list(images)
    prompt_length = None
    for text, is_answer in _pieces(processor, _messages(record), where):
        first = not ids
        n_images = text.count(image_token)
        if n_images:
            piece_images, remaining = remaining[:n_images], remaining[n_images:]
            out = processor(text=[text], images=piece_images, return_tensors="pt", add_special_tokens=first)
            for key, value in out.items():
                if key not in ("input_ids", "attention_mask") and isinstance(value, Tensor):
                    vision.setdefault(key, []).append(value)
        else:
            out = tokenizer([text], return_tensors="pt", add_special_tokens=first)
        piece = out["input_ids"][0].tolist()
        if is_answer:
            if prompt_length is None:
                prompt_length = len(ids)
            eos = tokenizer.eos_token_id
            if eos is not None and (not piece or piece[-1] != eos):
                piece = [*piece, eos]
            labels += piece
        else:
            labels += [-100] * len(piece)
        ids += piece
    if remaining:
        raise DataError(f"{where}: the chat template dropped {len(remaining)} image placeholder(s); use a template "
                        "that renders {'type': 'image'} content")
    if not any(label != -100 for label in labels):
        raise DataError(f"{where}: the answer tokenized to nothing; check the gpt turn's text")
    answer = next(t["value"] for t in record["conversations"] if _ROLES[t["from"]] == "assistant")
    return Example(torch.tensor(ids), torch.tensor(labels), {k: torch.cat(v) for k, v in vision.items()},
                   prompt_length or 0, answer.strip(), record.get("type"), record.get("id", index))


def collate(examples: Sequence[Example], pad_id: int, padding_side: str = "right") -> dict[str, Tensor]:
    """Pad a list of examples into a batch: ``input_ids``, ``attention_mask``, ``labels`` and the vision tensors
    concatenated (``pixel_values`` of every image in order)."""
    length = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[i, cols], mask[i, cols], labels[i, cols] = e.input_ids, 1, e.labels
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in dict.fromkeys(k for e in examples for k in e.vision):
        out[key] = torch.cat([e.vision[key] for e in examples if key in e.vision])
    return out
