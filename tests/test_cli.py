"""The ``dpvr-kernels`` CLI (demo, bench, analyze, flops) on tiny configs, and dpvr_kernels.analysis."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_folder import make_llava_folder, make_llava_next_folder, make_png
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import dpvr_kernels
from dpvr_kernels.analysis import attention_to_image_profile, suggest_route_layer
from dpvr_kernels.cli import main
from dpvr_kernels.cli.common import default_threads
from dpvr_kernels.flops import cost_model
from dpvr_kernels.presets import NAMED_CONFIGS, size_config
from dpvr_kernels.workloads import build_model, synthetic_batch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    config = size_config("tiny")
    return config, build_model(config, attn="sdpa", seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A user's model folder (tiny random LLaVA + processor with a chat template) and a PNG, made offline."""
    root = tmp_path_factory.mktemp("user_model")
    return make_llava_folder(root / "llava"), make_png(root / "photo.png")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000


# ----------------------------------------------------------------------------------------------------- demo


def test_demo_tiny_prints_table_and_passes(capsys, tmp_path):
    out_json = tmp_path / "res" / "demo.json"
    rc = main(["demo", "--size", "tiny", "--repeats", "1", "--steps", "2", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM WEIGHTS" in out
    for row in ("model", "tokens per stream", "route / fusion", "parameters", "prefill FLOPs (cost model)",
                "KV cache, cost model", "KV cache, measured", "prefill time", "decode (2 steps, tokens/s)",
                "numerics (max rel. error)", "kernels (describe)", "ideal"):
        assert row in out, row
    assert "numerics: PASS" in out
    assert "side branch: copy of layer 2" in out  # describe() lines

    res = json.loads(out_json.read_text())
    assert res["numerics"]["passed"] and res["numerics"]["max_rel_error"] < 1e-5
    assert res["random_weights"] is True
    # the live caches match the cost model at the padded length (text-only deep cache is right-aligned)
    rep = cost_model(size_config("tiny"), res["image_tokens"], res["text_tokens"], res["batch"], res["route_layer"],
                     dtype_bytes=4)
    assert res["stock"]["kv_bytes"] == rep.kv_bytes_stock
    assert res["dpvr"]["kv_bytes"] == rep.kv_bytes_dpvr
    assert res["tokens"]["pad"] > 0  # prompts of different lengths
    assert res["params"]["side_branch"] == rep.params_side_branch
    assert res["params"]["stock"] == rep.params_total


def test_demo_half_precision(capsys):
    assert main(["demo", "--size", "tiny", "--dtype", "bf16", "--repeats", "1", "--steps", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "numerics: PASS" in out and "tolerance 2e-02" in out and "bfloat16" in out


def test_threads_default_and_restored(monkeypatch):
    assert default_threads("tiny") == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert default_threads("cpu") == 3  # 8 cores, 5 busy
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 0.0, 0.0))
    assert default_threads("cpu") == 1  # never below one
    monkeypatch.undo()
    before = torch.get_num_threads()
    assert main(["flops", "--config", "llava-1.5-7b"]) == 0
    with pytest.raises(SystemExit):
        main(["demo", "--size", "tiny", "--threads", "2", "--route-layer", "9"])
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--route-layer", "3"], "route_layer=3 is out of range"),
        (["--pad", "40", "--text-tokens", "8"], "--pad 40 must be smaller"),
        (["--batch", "0"], "positive integer"),
        (["--size", "huge"], "invalid choice"),
    ],
)
def test_demo_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "tiny", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_demo_cuda_without_gpu_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "tiny", "--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- bench


def test_bench_tiny_writes_csv_and_png(capsys, tmp_path):
    out = tmp_path / "bench"
    rc = main(["bench", "--size", "tiny", "--image-tokens", "16,32", "--batches", "1", "--repeats", "1",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    with (out / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["batch"]), int(r["image_tokens"]), int(r["images"])) for r in rows] == [(1, 16, 1), (1, 32, 2)]
    for r in rows:
        assert float(r["stock_ms"]) > 0 and float(r["dpvr_ms"]) > 0
        assert float(r["measured_speedup"]) == pytest.approx(float(r["stock_ms"]) / float(r["dpvr_ms"]), rel=1e-2)
        rep = cost_model(size_config("tiny"), int(r["image_tokens"]), 32, 1, int(r["route_layer"]), dtype_bytes=4)
        assert float(r["ideal_speedup"]) == pytest.approx(rep.ideal_prefill_speedup, rel=1e-3)
    _assert_png(out / "bench.png")
    printed = capsys.readouterr().out
    assert "random weights" in printed and "bench.csv" in printed


def test_bench_image_tokens_must_be_whole_images(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--size", "tiny", "--image-tokens", "16,20", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not a multiple of the 16 tokens per image" in capsys.readouterr().err


def test_bench_bad_list_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--size", "tiny", "--batches", "1,x"])
    assert exc.value.code == 2
    assert "comma-separated" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- analyze


def test_analyze_tiny_table_and_png(capsys, tmp_path):
    rc = main(["analyze", "--size", "tiny", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d\.\d{4}\s", line)]
    assert [int(line.split()[0]) for line in rows] == [0, 1, 2, 3]
    assert "NOT meaningful" in out
    assert "suggested route layer:" in out
    _assert_png(tmp_path / "analyze.png")
    assert len((tmp_path / "analyze.csv").read_text().splitlines()) == 1 + 4


def test_analyze_model_folder(capsys, tmp_path, model_dir):
    folder, png = model_dir
    rc = main(["analyze", "--model", str(folder), "--image", str(png), "--prompt", "describe it",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NOT meaningful" not in out and "4 image tokens" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d\.\d{4}\s", line)]
    assert len(rows) == 4
    _assert_png(tmp_path / "out" / "analyze.png")


def _selection(batch, config):
    image = batch.input_ids == config.image_token_id
    valid = batch.attention_mask.bool()
    queries = valid & ~image & (image.long().cumsum(-1) > 0)
    return image, queries


def test_profile_matches_the_models_own_attentions(tiny):
    config, _ = tiny
    model = build_model(config, attn="eager", seed=1)
    batch = synthetic_batch(config, 3, 12, images=2, pad=5, seed=3)
    profile = attention_to_image_profile(model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    assert len(profile) == config.text_config.num_hidden_layers
    assert all(0.0 <= v <= 1.0 for v in profile)

    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        attentions = model(**batch.as_kwargs(), position_ids=pos, output_attentions=True).attentions
    image, queries = _selection(batch, config)
    for layer, attn in enumerate(attentions):
        total, count = 0.0, 0
        for b in range(attn.shape[0]):
            for q in range(attn.shape[2]):
                if not queries[b, q]:
                    continue
                for h in range(attn.shape[1]):
                    total += float(attn[b, h, q][image[b]].sum())
                    count += 1
        assert profile[layer] == pytest.approx(total / count, rel=1e-5, abs=1e-7)


def test_profile_layer0_from_scratch(tiny):
    """Layer 0's share recomputed from q/k projections, RoPE and an explicit causal + padding mask."""
    config, model = tiny  # sdpa model: the profile switches to eager for the call and back
    batch = synthetic_batch(config, 2, 10, images=1, pad=4, seed=5)
    captured = {}
    attn = model.model.language_model.layers[0].self_attn

    def hook(module, args, kwargs):
        captured["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["pe"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        profile = attention_to_image_profile(model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    finally:
        handle.remove()
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        assert cfg._attn_implementation == "sdpa"  # restored

    x, (cos, sin) = captured["x"], captured["pe"]
    bsz, length, _ = x.shape
    heads = config.text_config.num_attention_heads
    head_dim = config.text_config.hidden_size // heads
    with torch.no_grad():
        q = attn.q_proj(x).view(bsz, length, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, length, -1, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    valid = batch.attention_mask.bool()
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    image, queries = _selection(batch, config)
    share = (probs * image[:, None, None, :]).sum(-1)  # [B, H, L]
    expected = share.transpose(1, 2)[queries].mean()
    assert profile[0] == pytest.approx(float(expected), rel=1e-5)


def test_profile_refuses_patched_model_and_no_text_after_image(tiny):
    config, _ = tiny
    model = build_model(config, seed=0)
    batch = synthetic_batch(config, 1, 8)
    dpvr_kernels.patch(model)
    with pytest.raises(RuntimeError, match="unpatched model"):
        attention_to_image_profile(model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    dpvr_kernels.unpatch(model)
    # five text tokens, then the image's 16 tokens, then nothing: no text query follows an image
    image_only_tail = torch.cat([batch.input_ids[:, :5], torch.full((1, 16), config.image_token_id)], dim=1)
    with pytest.raises(ValueError, match="no text token comes after an image token"):
        attention_to_image_profile(model, image_only_tail, torch.ones_like(image_only_tail), batch.pixel_values)


def test_suggest_route_layer_rule():
    # paper-like: 0.68 at layer 0, 0.07 by layer 4, slowly down to 0.04 at 18, flat after (32 layers)
    paper = [0.68, 0.40, 0.20, 0.10, 0.07] + [0.07 - 0.03 * i / 14 for i in range(1, 15)] + [0.04] * 13
    assert len(paper) == 32
    r = suggest_route_layer(paper)  # threshold 0.068
    assert r == 5 and all(v <= 0.068 for v in paper[r:31]) and paper[r - 1] > 0.068
    assert suggest_route_layer(paper, fraction=0.06) == 18  # threshold 0.0408: the paper's plateau
    assert suggest_route_layer([0.5] * 8) is None  # no saturation
    # a late spike before the fusion layer resets the suggestion; the fusion layer itself does not count
    assert suggest_route_layer([1.0, 0.05, 0.05, 0.5, 0.05, 0.9]) == 4
    with pytest.raises(ValueError, match="fraction"):
        suggest_route_layer(paper, fraction=0.0)
    with pytest.raises(ValueError, match="fusion_layers"):
        suggest_route_layer([0.5], fusion_layers=1)


# ---------------------------------------------------------------------------------------------------- flops


def test_flops_7b_numbers(capsys):
    assert main(["flops", "--config", "llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "202,383,360" in out  # one Llama-7B decoder layer: the side branch
    assert "7,063,427,072" in out  # LLaVA-1.5-7B parameters
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\*?\s+\d+\s", line)]
    assert len(rows) == 31  # route layers 0..30
    assert any(re.match(r"^\s+18\*\s+13\s", line) for line in rows)  # default route layer, 13 text-only layers


def test_flops_full_report_for_a_route_layer(capsys):
    assert main(["flops", "--config", "llava-1.5-7b", "--route-layer", "18"]) == 0
    out = capsys.readouterr().out
    assert "[18,31) text only" in out and "ideal prefill speedup" in out and "202,383,360" in out


def test_flops_all_named_configs_by_default(capsys):
    assert main(["flops", "--text-tokens", "32"]) == 0
    out = capsys.readouterr().out
    for name in NAMED_CONFIGS:
        assert f"{name}:" in out


def test_flops_config_file(capsys, tmp_path):
    path = tmp_path / "config.json"
    size_config("tiny").to_json_file(str(path))
    assert main(["flops", "--config-file", str(path), "--image-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "2 image(s) of 16 tokens" in out
    with pytest.raises(SystemExit) as exc:
        main(["flops", "--config-file", str(path), "--image-tokens", "20"])
    assert exc.value.code == 2
    assert "not a multiple" in capsys.readouterr().err


def test_flops_unknown_config_lists_names(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["flops", "--config", "llava-70b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config 'llava-70b'" in err
    for name in NAMED_CONFIGS:
        assert name in err


def test_flops_route_layer_out_of_range(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["flops", "--config", "llava-1.5-7b", "--route-layer", "31"])
    assert exc.value.code == 2
    assert "route_layer=31 is out of range" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["demo"], ["bench"], ["analyze"], ["flops"]])
def test_help_exits_0(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: dpvr-kernels" in capsys.readouterr().out


def test_no_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_python_m_help():
    proc = subprocess.run([sys.executable, "-m", "dpvr_kernels", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "bench", "analyze", "flops"):
        assert command in proc.stdout


def test_analyze_without_text_after_the_image_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--size", "tiny", "--text-tokens", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2


# -------------------------------------------------------------------------------------------- --model DIR


def test_demo_model_folder_subprocess(tmp_path, model_dir):
    folder, png = model_dir
    out_json = tmp_path / "demo.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpvr_kernels", "demo", "--model", str(folder), "--image", str(png),
                           "--prompt", "what is in the picture", "--max-new-tokens", "6", "--repeats", "1",
                           "--json", str(out_json)], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "numerics: PASS" in out
    res = json.loads(out_json.read_text())
    stock, dpvr = res["stock"]["answer"], res["dpvr"]["answer"]
    assert stock and dpvr  # six greedy word tokens each
    assert res["stock"]["new_tokens"] == res["dpvr"]["new_tokens"] == 6
    answers = out[out.index("answers (greedy"):].splitlines()
    assert re.match(r"^\s+stock\s+\|\s+DPVR-LF$", answers[1])
    assert answers[2].split("|")[0].strip() == stock and answers[2].split("|")[1].strip() == dpvr
    for row in ("prefill time", "decode (generate, tokens/s)", "KV cache, measured", "prefill FLOPs (cost model)",
                "ideal", "photo.png"):
        assert row in out, row
    assert res["tokens"] == {"image": 4, "text": res["tokens"]["text"]} and res["tokens"]["text"] > 4
    # the live caches after the prefill match the cost model
    assert res["stock"]["kv_bytes"] == res["cost_model"]["kv_bytes_stock"]
    assert res["dpvr"]["kv_bytes"] == res["cost_model"]["kv_bytes_dpvr"] < res["stock"]["kv_bytes"]
    assert res["numerics"]["passed"] and res["numerics"]["max_rel_error"] < 1e-5
    assert res["stock"]["decode_tokens_per_s"] > 0 and res["dpvr"]["prefill_s"] > 0


def test_demo_llava_next_folder(capsys, tmp_path, model_dir):
    # Another class from the table, with its own processor (anyres tiles, image-newline rows): same report.
    folder = make_llava_next_folder(tmp_path / "llava_next")
    _, png = model_dir
    argv = ["demo", "--model", str(folder), "--image", str(png), "--prompt", "what is in the picture",
            "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LlavaNextForConditionalGeneration" in out and "numerics: PASS" in out
    assert re.search(r"tokens per sample\s+\d+ = (\d+) image", out).group(1) not in ("0", "4")  # tiles + newlines


def test_demo_model_default_sample_image(capsys, model_dir):
    folder, _ = model_dir
    assert main(["demo", "--model", str(folder), "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "sample.png 160x120" in out and "numerics: PASS" in out


def test_sample_image_is_package_data():
    from dpvr_kernels.cli.common import sample_image_path

    path = sample_image_path()
    assert path.read_bytes()[:8] == PNG_SIGNATURE and 100 < path.stat().st_size < 20_000


def test_bench_model_folder(capsys, tmp_path, model_dir):
    folder, png = model_dir
    rc = main(["bench", "--model", str(folder), "--image", str(png), "--batches", "1,2", "--repeats", "1",
               "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with (tmp_path / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["batch"]), int(r["image_tokens"])) for r in rows] == [(1, 4), (2, 4)]
    assert all(float(r["stock_ms"]) > 0 and float(r["ideal_speedup"]) >= 1.0 for r in rows)


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory, model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("bad")
    LlavaForConditionalGeneration.from_pretrained(model_dir[0]).save_pretrained(root / "no_processor")
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=100)).save_pretrained(root / "text_only")
    (root / "empty").mkdir()
    from transformers import Qwen2VLConfig

    Qwen2VLConfig().save_pretrained(root / "qwen2_vl")  # no processor saved
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{bad}/missing"], "no such folder. Pass a folder saved with model.save_pretrained"),
        (["--model", "{bad}/empty"], "has no config.json"),
        (["--model", "nobody/no-such-llava"], "not in the local Hugging Face cache"),
        (["--model", "{bad}/no_processor"], "processor.save_pretrained(DIR)"),
        (["--model", "{bad}/text_only"], "is not a LLaVA-family model. DPVR-LF patches LlavaForConditionalGeneration"),
        (["--model", "{bad}/qwen2_vl"], "no processor with an image processor in it"),
        (["--model", "{good}", "--image", "{bad}/none.png"], "--image {bad}/none.png: no such file"),
        (["--model", "{good}", "--image", "{bad}/empty"], "not an image PIL can read"),
        (["--model", "{good}", "--size", "tiny"], "--model and --size exclude each other"),
        (["--model", "{good}", "--text-tokens", "9"], "with --model the prompt is --prompt and --image"),
        (["--size", "tiny", "--image", "x.png"], "--image and --prompt go with --model"),
        (["--model", "{good}", "--imag", "x.png"], "unrecognized arguments: --imag"),  # no prefix matching
    ],
)
def test_demo_model_bad_input_exits_2(capsys, model_dir, bad_folders, argv, message):
    fill = {"bad": str(bad_folders), "good": str(model_dir[0])}
    with pytest.raises(SystemExit) as exc:
        main(["demo", *[a.format(**fill) for a in argv]])
    assert exc.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the shipped demo model


def test_demo_default_runs_the_shipped_model(capsys, tmp_path):
    """`make demo`: held-out grids with the truth and both answers, held-out accuracy, speed, numerics."""
    out_json = tmp_path / "shipped.json"
    rc = main(["demo", "--samples", "3", "--held-out", "100", "--batch", "16", "--repeats", "1", "--json",
               str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "LLaVA trained here on real handwritten digits" in out and "numerics: PASS" in out
    for text in ("grid 1 of 3", "question", "truth", "held-out accuracy", "overall", "ideal", "DPVR-LF on"):
        assert text in out, text
    res = json.loads(out_json.read_text())
    assert len(res["samples"]) == 3 and all(s["truth"] for s in res["samples"])
    assert res["held_out"]["n"] == 100 and res["held_out"]["stock"]["overall"] >= 0.85
    assert res["route_layer"] == json.loads((Path(dpvr_kernels.demo_model(distilled=True)) / "config.json")
                                            .read_text())["dpvr"]["route_layer"]
    assert res["numerics"]["passed"]


def test_demo_options_of_the_other_modes_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--route-layer", "3"])
    assert exc.value.code == 2 and "not options of the shipped-model demo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "tiny", "--samples", "3"])
    assert exc.value.code == 2 and "go with the shipped-model demo" in capsys.readouterr().err


def test_model_demo_dpvr_keeps_its_distilled_side_branch(capsys, tmp_path):
    """--model demo-dpvr: the distilled side branch at its saved route layer (not a fresh copy), a held-out grid
    and a grammar question by default; stock is the same weights under stock_forward."""
    out_json = tmp_path / "demo_dpvr.json"
    assert main(["demo", "--model", "demo-dpvr", "--max-new-tokens", "3", "--repeats", "1", "--json",
                 str(out_json)]) == 0
    out = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    saved = json.loads((Path(dpvr_kernels.demo_model(distilled=True)) / "config.json").read_text())["dpvr"]
    assert res["distilled_side_branch"] and res["route_layer"] == saved["route_layer"]
    assert "held_out_grid" in out and "numerics: PASS" in out
    assert res["stock"]["answer"] and res["stock"]["answer"].split()[0] in (
        [str(n) for n in range(19)] + ["yes", "no", "top", "bottom"])


def test_flops_and_analyze_take_the_demo_names(capsys, tmp_path):
    assert main(["flops", "--model", "demo"]) == 0
    assert "parameters; side branch" in capsys.readouterr().out
    assert main(["analyze", "--model", "demo", "--out", str(tmp_path)]) == 0
    assert "suggested route layer" in capsys.readouterr().out
