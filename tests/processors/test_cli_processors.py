"""``demo``, ``bench`` and ``analyze --model`` on folders of every supported class (besides LLaVA and LLaVA-NeXT,
which tests/test_cli.py covers) with their own processors, which need torchvision: ``make processors-test`` runs
these in their own environment. Each command routes the processor's vision tokens and checks numerics against
``reference_forward``; where the cost model prices the class's tower, it prices exactly the tokens the processor
inserted (the image processor's pixel budget read from the folder)."""

from __future__ import annotations

import csv
import re

import pytest
from model_folder import make_png
from processor_folders import (
    make_deepseek_folder,
    make_fast_vlm_folder,
    make_idefics3_folder,
    make_internvl_folder,
    make_llava_video_folder,
    make_mistral3_folder,
    make_ovis2_folder,
    make_perception_lm_folder,
    make_qwen_folder,
    make_smolvlm_folder,
    make_vipllava_folder,
)

from dpvr_kernels.cli import main

MROPE = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"]
DEEPSEEK = ["deepseek_vl", "deepseek_vl_hybrid", "janus"]
LLAVA_VIDEO = ["llava_onevision", "llava_next_video"]
MAKERS = {**{name: (lambda d, name=name: make_qwen_folder(d, name)) for name in MROPE},
          **{name: (lambda d, name=name: make_deepseek_folder(d, name)) for name in DEEPSEEK},
          **{name: (lambda d, name=name: make_llava_video_folder(d, name)) for name in LLAVA_VIDEO},
          "internvl": make_internvl_folder, "mistral3": make_mistral3_folder, "smolvlm": make_smolvlm_folder,
          "idefics3": make_idefics3_folder, "ovis2": make_ovis2_folder, "fast_vlm": make_fast_vlm_folder,
          "perception_lm": make_perception_lm_folder, "vipllava": make_vipllava_folder}
NAMES = list(MAKERS)
#: Classes whose vision tower the cost model does not price (demo prints "cost model  n/a", bench leaves the ideal
#: columns NaN), with the image tokens the processor inserts for the demo's two images (photo.png, wide.png):
#: a fixed count per image for DeepSeek-VL, -Hybrid, Janus (16) and FastVLM (4: 64 px at stride 32); per tile
#: for Ovis2 (16 x 9 tiles: the two grids and a thumbnail each) and PerceptionLM (4 x 5 tiles per image).
UNPRICED = {"deepseek_vl": 32, "deepseek_vl_hybrid": 32, "janus": 32, "fast_vlm": 8, "ovis2": 144,
            "perception_lm": 40}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("processor_folders")
    png = make_png(root / "photo.png", 70, 110)
    wide = make_png(root / "wide.png", 40, 150, seed=1)
    return {name: MAKERS[name](root / name) for name in NAMES}, png, wide


@pytest.mark.parametrize("name", NAMES)
def test_demo_on_a_processor_folder(capsys, folders, name):
    dirs, png, wide = folders
    argv = ["demo", "--model", str(dirs[name]), "--image", str(png), "--image", str(wide), "--prompt",
            "what is in the picture", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "numerics: PASS" in out
    total, image_tokens = map(int, re.search(r"tokens per sample\s+(\d+) = (\d+) image", out).groups())
    if name in UNPRICED:
        # No cost model for this tower: the processor's own token count, and the measured KV cache drops by exactly
        # the image tokens of the one text-only layer (route 2, fusion 1 of 4 layers).
        assert re.search(r"cost model\s+n/a: ", out)
        assert image_tokens == UNPRICED[name]
        assert f"saved {100 * image_tokens / (4 * total):.1f} %" in re.search(r"KV cache, measured.*", out).group()
        return
    # The cost model priced what the processor inserted: its count, and its KV bytes equal the live cache's
    # (VipLLaVA's fixed-size images are summarised as "2 image(s) of 4 tokens").
    assert (f"2 image(s), 0 video(s): {image_tokens} tokens" in out
            or f"2 image(s) of {image_tokens // 2} tokens" in out)
    assert "(stock = cost model, DPVR = cost model)" in out


@pytest.mark.parametrize("name", NAMES)
def test_bench_on_a_processor_folder(capsys, tmp_path, folders, name):
    dirs, png, _ = folders
    rc = main(["bench", "--model", str(dirs[name]), "--image", str(png), "--batches", "1,2", "--repeats", "1",
               "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with (tmp_path / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["batch"]) for r in rows] == [1, 2]
    assert len({int(r["image_tokens"]) for r in rows}) == 1 and int(rows[0]["image_tokens"]) > 0
    assert all(float(r["stock_ms"]) > 0 and float(r["dpvr_ms"]) > 0 for r in rows)
    ideal = [float(r["ideal_speedup"]) for r in rows]
    # Unpriced classes are timed all the same, without an ideal (NaN).
    assert all(x != x for x in ideal) if name in UNPRICED else all(x >= 1.0 for x in ideal)


@pytest.mark.parametrize("name", NAMES)
def test_analyze_on_a_processor_folder(capsys, tmp_path, folders, name):
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
