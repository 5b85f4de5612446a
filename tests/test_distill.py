"""Side-branch distillation (``dpvr-kernels distill``), the stock-forward teacher, conversation data and
``dpvr-kernels eval``, on a tiny random LLaVA folder with a word tokenizer, chat template and PNG images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_util import run_ranks
from model_folder import make_llava_folder, make_png
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

import dpvr_kernels
from dpvr_kernels.cli import main
from dpvr_kernels.conversations import DataError, collate, encode, load_records, read_images
from dpvr_kernels.distill import ConversationDataset, distill, load_side_branch
from dpvr_kernels.evaluation import greedy_answers
from dpvr_kernels.flops import cost_model

WORDS = "a cat dog red blue house sun tree".split()
ROUTE = 2


def _records(n: int, offset: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "image": f"img/{i % 6}.png", "type": "even" if i % 2 == 0 else "odd",
             "conversations": [{"from": "human", "value": "<image>\nwhat is in the picture"},
                               {"from": "gpt", "value": f"{WORDS[i % 8]} {WORDS[(3 * i + 1) % 8]}"}]}
            for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny LLaVA + processor, with data/train.json (12 records), data/eval.json (6) and data/img/*.png."""
    root = make_llava_folder(tmp_path_factory.mktemp("distill") / "llava", layers=4)
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for i in range(6):
        make_png(data / "img" / f"{i}.png", height=30 + 3 * i, width=40 - 2 * i, seed=i)
    (data / "train.json").write_text(json.dumps(_records(12)))
    (data / "eval.json").write_text("\n".join(json.dumps(r) for r in _records(6, offset=100)) + "\n")  # JSONL
    return root


def _load(path: Path) -> LlavaForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


def _batch(folder: Path, records: list[dict]) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    examples = [encode(processor, r, read_images(i, r, folder / "data"), i) for i, r in enumerate(records)]
    return collate(examples, processor.tokenizer.pad_token_id)


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


# ----------------------------------------------------------------------------------------- stock-forward teacher


def test_stock_forward_is_bit_equal_to_unpatched(folder):
    batch = _batch(folder, _records(5))
    stock = _logits(_load(folder), batch)
    model = dpvr_kernels.patch(_load(folder), route_layer=ROUTE)
    dpvr = _logits(model, batch)
    with dpvr_kernels.stock_forward(model) as same:
        assert same is model and dpvr_kernels.is_patched(model)
        teacher = _logits(model, batch)
    assert torch.equal(teacher, stock)
    assert not torch.allclose(dpvr, stock, atol=1e-4)  # the routed forward really differs
    assert torch.equal(_logits(model, batch), dpvr)  # and it is back after the block
    with dpvr_kernels.stock_forward(_load(folder)) as plain:  # unpatched: a no-op
        assert torch.equal(_logits(plain, batch), stock)


def test_training_the_fusion_layers_keeps_the_teacher(folder):
    """With the fusion layers trainable, the stock forward (the teacher) still computes with their original
    weights: a teacher that moved with the student would let both meet halfway (low KL, wrong answers)."""
    batch = _batch(folder, _records(4))
    stock = _logits(_load(folder), batch)
    model = dpvr_kernels.patch(_load(folder), route_layer=ROUTE)
    last = model.model.language_model.layers[-1]
    before = {n: p.detach().clone() for n, p in last.named_parameters()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    dpvr_kernels.distill_side_branch(model, None, [inputs], steps=3, lr=1e-2, fusion_layers=True)
    assert any(not torch.equal(p, before[n]) for n, p in last.named_parameters())  # the fusion layer trained
    with torch.no_grad(), dpvr_kernels.stock_forward(model):
        assert torch.equal(_logits(model, batch), stock)
    assert any(not torch.equal(p, before[n]) for n, p in last.named_parameters())  # and is back after the block
    assert not any("dpvr_stock" in k for k in model.state_dict())  # the copies are not saved
    dpvr_kernels.mark_trainable(model, fusion_layers=True)  # again: still the original weights, not the trained
    with torch.no_grad(), dpvr_kernels.stock_forward(model):
        assert torch.equal(_logits(model, batch), stock)
    dpvr_kernels.unpatch(model)  # drops the copies; the stock model now has the trained fusion layer
    assert not any("dpvr_stock" in n for n, _ in model.named_buffers())
    assert not torch.allclose(_logits(model, batch), stock, atol=1e-4)


# ------------------------------------------------------------------------------------------------- conversation data


def test_encode_marks_answer_tokens_after_the_generation_prompt(folder):
    processor = AutoProcessor.from_pretrained(folder)
    record = _records(1)[0]
    example = encode(processor, record, read_images(0, record, folder / "data"))
    tok = processor.tokenizer
    answer = example.input_ids[example.prompt_length:]
    assert tok.decode(answer, skip_special_tokens=True).split() == record["conversations"][1]["value"].split()
    assert answer[-1].item() == tok.eos_token_id  # the template adds none, so EOS is appended
    assert (example.labels[:example.prompt_length] == -100).all()
    assert torch.equal(example.labels[example.prompt_length:], answer)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "what is in the picture"}]}], add_generation_prompt=True)
    expected = processor(text=[prompt], images=read_images(0, record, folder / "data"), return_tensors="pt")
    assert torch.equal(example.input_ids[:example.prompt_length], expected["input_ids"][0])
    assert torch.equal(example.vision["pixel_values"], expected["pixel_values"])


def _bad(tmp_path: Path, folder: Path, record: dict, name: str = "bad.json") -> Path:
    records = _records(3)
    records.insert(1, record)
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("case, fragment", [
    ("missing_image", "not found"),
    ("placeholder_without_image", "1 <image> placeholder(s) but no 'image'"),
    ("image_without_placeholder", "0 <image> placeholder(s) but 1 image(s)"),
    ("empty_answer", "empty answer"),
    ("unreadable_image", "not an image PIL can read"),
    ("no_answer_turn", "no 'gpt' turn"),
])
def test_bad_records_name_the_record(folder, tmp_path, case, fragment):
    record = _records(1, offset=50)[0]
    record["id"] = "broken"
    if case == "missing_image":
        record["image"] = "img/nope.png"
    elif case == "placeholder_without_image":
        del record["image"]
    elif case == "image_without_placeholder":
        record["conversations"][0]["value"] = "what is in the picture"
    elif case == "empty_answer":
        record["conversations"][1]["value"] = "  "
    elif case == "unreadable_image":
        (folder / "data" / "img" / "garbage.png").write_bytes(b"this is not a png")
        record["image"] = "img/garbage.png"
    elif case == "no_answer_turn":
        record["conversations"] = record["conversations"][:1]
    path = _bad(tmp_path, folder, record)
    processor = AutoProcessor.from_pretrained(folder)
    with pytest.raises(DataError) as err:
        ConversationDataset(processor, path, folder / "data")
    assert "record 1 (id 'broken')" in str(err.value) and fragment in str(err.value)
    # the command line: exit code 2 with the same message, before any training
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--model", str(folder), "--data", str(path), "--image-folder", str(folder / "data"),
              "--route-layer", "2", "--out", str(tmp_path / "never")])
    assert exit_.value.code == 2
    assert not (tmp_path / "never").exists()


def test_data_file_errors(tmp_path):
    (tmp_path / "not.json").write_text("[{]")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(tmp_path / "not.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.json")
    (tmp_path / "lines.jsonl").write_text('{"image": "a.png", "conversations": []}\n')
    with pytest.raises(DataError, match="record 0: 'conversations' must be a non-empty list"):
        load_records(tmp_path / "lines.jsonl")


# -------------------------------------------------------------------------------------------------- distill


def _kl(model, batch: dict) -> float:
    """Mean KL(stock || DPVR-LF) per answer token (the loss that distill lowers), recomputed here."""
    with torch.no_grad():
        student = _logits(model, batch)
        with dpvr_kernels.stock_forward(model):
            teacher = _logits(model, batch)
    kl = dpvr_kernels.answer_kl(student, teacher, batch["labels"])
    return float(kl.sum() / (batch["labels"][:, 1:] != -100).sum())


@pytest.fixture(scope="module")
def distilled(folder, tmp_path_factory):
    """20 steps of distill (side branch only), with checkpoints every 10 steps."""
    out = tmp_path_factory.mktemp("distilled") / "out"
    rc = main(["distill", "--model", str(folder), "--data", str(folder / "data" / "train.json"), "--image-folder",
               str(folder / "data"), "--route-layer", str(ROUTE), "--out", str(out), "--max-steps", "20",
               "--batch-size", "4", "--lr", "3e-3", "--save-steps", "10", "--eval-data",
               str(folder / "data" / "eval.json"), "--no-progress", "--threads", "1"])
    assert rc == 0
    return out


def test_distill_lowers_held_out_kl_and_restores_bit_equal(folder, distilled):
    held_out = _batch(folder, [json.loads(line) for line in (folder / "data" / "eval.json").read_text().splitlines()])
    untrained = dpvr_kernels.patch(_load(folder), route_layer=ROUTE)
    before = _kl(untrained, held_out)
    report = json.loads((distilled / "distill.json").read_text())
    assert report["result"]["steps"] == 20
    assert report["result"]["held_out_kl_before"] == pytest.approx(before, rel=1e-4)

    restored = dpvr_kernels.patch(_load(distilled))  # from_pretrained + patch(): saved route and side branch
    assert restored.config.dpvr["route_layer"] == ROUTE
    after = _kl(restored, held_out)
    print(f"held-out answer KL: {before:.5f} untrained -> {after:.5f} after 20 steps")
    assert after < 0.9 * before
    assert report["result"]["held_out_kl_after"] == pytest.approx(after, rel=1e-4)
    # only the side branch changed: every other tensor is the base folder's, bit for bit
    base = _load(folder).state_dict()
    side = [k for k in restored.state_dict() if "dpvr_side_branch" in k]
    assert side and all(torch.equal(v, base[k]) for k, v in restored.state_dict().items() if k not in side)
    # the checkpoint of step 20 holds the trained tensors only, equal to the final folder's
    from safetensors.torch import load_file

    ckpt = load_file(str(distilled / "checkpoints" / "checkpoint-20" / "model.safetensors"))
    assert sorted(ckpt) == sorted(side)
    assert all(torch.equal(ckpt[k], restored.state_dict()[k]) for k in side)


def test_side_branch_only_output(folder, tmp_path):
    out = tmp_path / "side"
    rc = main(["distill", "--model", str(folder), "--data", str(folder / "data" / "train.json"), "--image-folder",
               str(folder / "data"), "--route-layer", str(ROUTE), "--out", str(out), "--max-steps", "3",
               "--batch-size", "4", "--lr", "3e-3", "--side-branch-only", "--train-fusion", "--no-progress",
               "--threads", "1"])
    assert rc == 0
    assert not (out / "config.json").exists() and (out / "dpvr_side_branch.safetensors").is_file()
    info = json.loads((out / "dpvr_side_branch.json").read_text())
    assert info["dpvr"]["route_layer"] == ROUTE and info["fusion_layers_trained"]
    model = load_side_branch(_load(folder), out)
    batch = _batch(folder, _records(3))
    first = _logits(model, batch)
    assert torch.equal(_logits(dpvr_kernels.load_side_branch(_load(folder), out), batch), first)
    assert not torch.allclose(first, _logits(dpvr_kernels.patch(_load(folder), route_layer=ROUTE), batch))
    with dpvr_kernels.stock_forward(model):  # the folder's fusion layer trained; stock is still the base's
        assert torch.equal(_logits(model, batch), _logits(_load(folder), batch))
    with pytest.raises(ValueError, match="patched with"):
        load_side_branch(dpvr_kernels.patch(_load(folder), route_layer=ROUTE - 1), out)
    with pytest.raises(FileNotFoundError, match="dpvr_side_branch.json"):
        load_side_branch(_load(folder), folder)


def test_resume_continues_from_the_saved_step(folder, distilled, tmp_path):
    """Resume from checkpoint-10 of the 20-step run: steps 11..20 again, and the same side branch as the run that
    never stopped (optimizer, scheduler, RNG and data position restored)."""
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(distilled / "checkpoints" / "checkpoint-10", out / "checkpoints" / "checkpoint-10")
    rc = main(["distill", "--model", str(folder), "--data", str(folder / "data" / "train.json"), "--image-folder",
               str(folder / "data"), "--route-layer", str(ROUTE), "--out", str(out), "--max-steps", "20",
               "--batch-size", "4", "--lr", "3e-3", "--save-steps", "10", "--resume", "--no-progress",
               "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "distill.json").read_text())
    assert report["settings"]["resumed_from"].endswith("checkpoint-10")
    assert report["result"]["steps"] == 20 and report["result"]["steps_run"] == 10  # steps 1..10 not run again
    assert json.loads((distilled / "distill.json").read_text())["result"]["steps_run"] == 20
    resumed = dpvr_kernels.patch(_load(out)).state_dict()
    straight = dpvr_kernels.patch(_load(distilled)).state_dict()
    side = [k for k in straight if "dpvr_side_branch" in k]
    err = max(float((resumed[k] - straight[k]).abs().max()) for k in side)
    assert err < 1e-6, err
    with pytest.raises(SystemExit) as exit_:  # nothing to resume from
        main(["distill", "--model", str(folder), "--data", str(folder / "data" / "train.json"), "--image-folder",
              str(folder / "data"), "--route-layer", str(ROUTE), "--out", str(tmp_path / "fresh"), "--resume"])
    assert exit_.value.code == 2


def test_distill_two_ranks_equal_one_process(folder, tmp_path):
    """torchrun-style DDP on 2 gloo ranks (2 records each) == one process (4 records): the loss is normalised by
    the answer tokens of the whole step, so the side branch ends the same."""
    data = tmp_path / "four.json"
    data.write_text(json.dumps(_records(4)))
    common = dict(route_layer=ROUTE, max_steps=3, lr=3e-3, progress=False, warmup=0)
    run_ranks("distill", tmp_path / "ranks", str(folder), str(data), timeout=120)
    distill(folder, data, folder / "data", tmp_path / "single", batch_size=4, **common)
    ranks = dpvr_kernels.patch(_load(tmp_path / "ranks" / "out")).state_dict()
    single = dpvr_kernels.patch(_load(tmp_path / "single")).state_dict()
    side = [k for k in single if "dpvr_side_branch" in k]
    base = _load(folder).state_dict()
    moved = max(float((single[k] - base[k.replace("dpvr_side_branch", f"layers.{ROUTE}")]).abs().max())
                for k in side if "layers" not in k)
    err = max(float((ranks[k] - single[k]).abs().max()) for k in side)
    info = json.loads((tmp_path / "ranks" / "out" / "distill.json").read_text())
    print(f"2 ranks vs 1 process: max side-branch difference {err:.3g} (trained by {moved:.3g})")
    assert info["settings"]["world_size"] == 2 and moved > 1e-3
    assert err < 1e-5


# ------------------------------------------------------------------------------------------------------ eval


def test_eval_fields_on_known_answers(folder, tmp_path):
    """Reference answers are set to the stock model's own greedy answers on the 'even' records and to a wrong
    answer on the 'odd' ones, so stock scores exactly 1.0 and 0.0; agreement, KL and FLOPs are recomputed."""
    processor = AutoProcessor.from_pretrained(folder)
    records = _records(8)
    examples = [encode(processor, r, read_images(i, r, folder / "data"), i) for i, r in enumerate(records)]
    model = _load(folder)
    stock_answers, _ = greedy_answers(model, processor, examples, batch=3)
    for record, answer in zip(records, stock_answers, strict=True):
        record["conversations"][1]["value"] = answer if record["type"] == "even" else "red " + answer
    data = tmp_path / "known.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(folder), "--data", str(data), "--image-folder", str(folder / "data"),
               "--route-layers", "1,2", "--json", str(out), "--batch-size", "3", "--threads", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["records"] == 8 and res["side_branch"] == "untrained"
    assert res["stock"]["accuracy"] == {"even": 1.0, "odd": 0.0, "overall": 0.5}
    assert [row["route_layer"] for row in res["dpvr"]] == [1, 2]
    examples = [encode(processor, r, read_images(i, r, folder / "data"), i) for i, r in enumerate(records)]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    for row in res["dpvr"]:
        for key in ("accuracy", "agreement", "answer_kl", "flops_saved", "samples_per_s"):
            assert key in row
        r = row["route_layer"]
        patched = dpvr_kernels.patch(_load(folder), route_layer=r)
        answers, _ = greedy_answers(patched, processor, examples, batch=3)
        assert [rec[f"dpvr_r{r}"] for rec in res["per_record"]] == answers
        assert row["agreement"] == pytest.approx(sum(a == s for a, s in zip(answers, stock_answers, strict=True)) / 8)
        assert row["answer_kl"] == pytest.approx(_kl(patched, batch), rel=1e-4)
        vision = [int((e.input_ids[:e.prompt_length] == model.config.image_token_id).sum()) for e in examples]
        reps = [cost_model(model.config, v, e.prompt_length - v, 1, r) for v, e in zip(vision, examples, strict=True)]
        assert row["flops_saved"] == pytest.approx(1 - sum(x.flops_dpvr for x in reps) / sum(x.flops_stock for x in reps))
        assert 0 < row["flops_saved"] < 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit_:  # out of range for 4 layers
        main(["eval", "--model", str(folder), "--data", str(data), "--image-folder", str(folder / "data"),
              "--route-layers", "3"])
    assert exit_.value.code == 2
