"""``demo``, ``bench`` and ``analyze --model`` on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, InternVL, Mistral3 and
SmolVLM folders with their own processors (which need torchvision: ``make processors-test`` runs these in their own
environment). Each command
routes the processor's vision tokens, checks numerics against ``reference_forward``, and prices exactly the
tokens the processor inserted (the image processor's pixel budget read from the folder)."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from model_folder import make_png
from processor_folders import (
    make_internvl_folder,
    make_mistral3_folder,
    make_qwen_folder,
    make_smolvlm_folder,
)

from dpvr_kernels.cli import main

MROPE = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"]
NAMES = [*MROPE, "internvl", "mistral3", "smolvlm"]
MAKERS = {**{name: (lambda d, name=name: make_qwen_folder(d, name)) for name in MROPE},
          "internvl": make_internvl_folder, "mistral3": make_mistral3_folder,
          "smolvlm": make_smolvlm_folder}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_folders")
    png = make_png(root / "photo.png", 70, 110)
    wide = make_png(root / "wide.png", 40, 150, seed=1)
    return {name: MAKERS[name](root / name) for name in NAMES}, png, wide


@pytest.mark.parametrize("name", NAMES)
def test_demo_on_a_qwen_folder(capsys, folders, name):
    dirs, png, wide = folders
    argv = ["demo", "--model", str(dirs[name]), "--image", str(png), "--image", str(wide), "--prompt",
            "what is in the picture", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "numerics: PASS" in out
    image_tokens = int(re.search(r"tokens per sample\s+\d+ = (\d+) image", out).group(1))
    # The cost model priced what the processor inserted: its count, and its KV bytes equal the live cache's.
    assert f"2 image(s), 0 video(s): {image_tokens} tokens" in out
    assert "(stock = cost model, DPVR = cost model)" in out


@pytest.mark.parametrize("name", NAMES)
def test_bench_on_a_qwen_folder(capsys, tmp_path, folders, name):
    dirs, png, _ = folders
    rc = main(["bench", "--model", str(dirs[name]), "--image", str(png), "--batches", "1,2", "--repeats", "1",
               "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with (tmp_path / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["batch"]) for r in rows] == [1, 2]
    assert len({int(r["image_tokens"]) for r in rows}) == 1 and int(rows[0]["image_tokens"]) > 0
    assert all(float(r["stock_ms"]) > 0 and float(r["ideal_speedup"]) >= 1.0 for r in rows)


@pytest.mark.parametrize("name", NAMES)
def test_analyze_on_a_qwen_folder(capsys, tmp_path, folders, name):
    dirs, png, _ = folders
    rc = main(["analyze", "--model", str(dirs[name]), "--image", str(png), "--prompt", "describe it", "--out",
               str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NOT meaningful" not in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d\.\d{4}\s", line)]
    assert len(rows) == 4  # one share per decoder layer
    shares = [float(line.split()[1]) for line in rows]
    assert all(0.0 < s < 1.0 for s in shares)
