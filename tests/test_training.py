"""Training the side branch: gradients against the reference, labels loss, distillation, freezing,
gradient checkpointing, the HF Trainer and the example script."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny import IMAGE_TOKEN, make_batch, tiny_llava
from transformers import LlavaForConditionalGeneration

import dpvr_kernels
from dpvr_kernels.presets import named_config
from dpvr_kernels.reference import reference_forward
from dpvr_kernels.training import distill_side_branch, distillation_kl, distillation_loss, mark_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Left padding, a sample with two images, a sample without an image, an image-only prefix.
LAYOUTS = [["T", "I", "T", "T", "I", "T"], ["T", "T", "T"], ["I", "T", "T", "T", "T"]]


def _batch(seed: int = 1) -> dict:
    input_ids, attention_mask, pixel_values = make_batch(LAYOUTS, seed=seed)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x max |grad| {scale:.3g}"


def _labels(input_ids, attention_mask):
    """Next-token labels: -100 at pads, image tokens and each sample's first token (predicted from a pad)."""
    first = attention_mask.cumsum(-1) == 1
    ignore = (attention_mask == 0) | (input_ids == IMAGE_TOKEN) | first
    return input_ids.masked_fill(ignore, -100)


def _lm(model):
    return model.model.language_model


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend,fusion", [("torch", 1), ("auto", 2)])
def test_gradients_match_reference(backend, fusion):
    model = tiny_llava(layers=6)
    dpvr_kernels.patch(model, fusion_layers=fusion, backend=backend)
    batch = _batch()
    mask = batch["attention_mask"]
    weights = torch.randn(*mask.shape, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(3))
    lm = _lm(model)
    checked = {"embed_tokens": lm.embed_tokens.weight}
    checked |= {f"side.{n}": p for n, p in lm.dpvr_side_branch.named_parameters()}
    for i in range(len(lm.layers) - fusion, len(lm.layers)):
        checked |= {f"layers.{i}.{n}": p for n, p in lm.layers[i].named_parameters()}

    def grads(logits):
        loss = (logits * weights * mask[..., None]).sum()  # every valid position matters, pads none
        return torch.autograd.grad(loss, list(checked.values()))

    fast = grads(model(**batch, use_cache=False).logits)
    ref = grads(reference_forward(model, batch["input_ids"], batch["pixel_values"], mask))
    for name, g, r in zip(checked, fast, ref, strict=True):
        assert torch.isfinite(g).all(), name
        _assert_close_rel(g, r, 1e-5, name)
    # the side branch really learns from this loss
    assert any(g.abs().max() > 0 for n, g in zip(checked, fast, strict=True) if n.startswith("side."))


def test_labels_loss_matches_reference_cross_entropy():
    model = tiny_llava(layers=6)
    dpvr_kernels.patch(model)
    batch = _batch()
    labels = _labels(batch["input_ids"], batch["attention_mask"])
    loss = model(**batch, labels=labels, use_cache=False).loss
    with torch.no_grad():
        ref = reference_forward(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    expected = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ the loss


def test_distillation_loss_is_masked_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    student[0, :2] = float("nan")  # whatever sits at pad positions plays no part
    p_t = teacher.softmax(-1)
    kl = (p_t * (p_t.log() - student.log_softmax(-1))).sum(-1)
    expected = kl[mask.bool()].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, mask), expected)
    assert distillation_loss(teacher, teacher, mask).abs() < 1e-6
    t = 2.0
    p_t = (teacher / t).softmax(-1)
    kl_t = (p_t * (p_t.log() - (student / t).log_softmax(-1))).sum(-1)
    torch.testing.assert_close(distillation_loss(student, teacher, mask, temperature=t), kl_t[mask.bool()].mean() * t * t)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(student, teacher[:, :4], None)


# --------------------------------------------------------------------------------- training helper


@pytest.mark.parametrize("fusion_layers", [False, True])
def test_distill_lowers_loss_and_freezes_the_rest(fusion_layers):
    model = tiny_llava(layers=6)
    teacher = copy.deepcopy(model)
    dpvr_kernels.patch(model)
    batches = [_batch(seed=1), _batch(seed=2)]
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    kl_before = distillation_kl(model, teacher, batches)
    assert kl_before > 0  # DPVR-LF is not the stock model: there is a gap to close

    history = distill_side_branch(model, teacher, batches, steps=8, lr=1e-3, fusion_layers=fusion_layers)
    assert len(history) == 8 and all(h == h for h in history)
    kl_after = distillation_kl(model, teacher, batches)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after, history)
    assert model.training is False  # mode restored

    last = f"model.language_model.layers.{len(_lm(model).layers) - 1}."
    for name, p in model.named_parameters():
        trained = name.startswith("model.language_model.dpvr_side_branch.") or (fusion_layers and name.startswith(last))
        assert p.requires_grad == trained, name
        if trained:
            assert not torch.equal(p, before_params[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before_params[name]), f"frozen {name} changed"
    for name, p in teacher.named_parameters():  # the teacher is untouched too
        assert torch.equal(p, before_params[name]), f"teacher {name} changed"


# --------------------------------------------------------------------------------- mark_trainable


def test_mark_trainable_needs_a_patched_model():
    model = tiny_llava(layers=4)
    with pytest.raises(ValueError, match=r"dpvr_kernels\.patch\(model\) first"):
        mark_trainable(model)


def test_mark_trainable_tiny_summary():
    model = tiny_llava(layers=6)
    stock_total = sum(p.numel() for p in model.parameters())
    dpvr_kernels.patch(model, fusion_layers=2)
    lm = _lm(model)
    side = sum(p.numel() for p in lm.dpvr_side_branch.parameters())
    layer = sum(p.numel() for p in lm.layers[-1].parameters())

    s = mark_trainable(model)
    assert (s.trainable, s.total, s.stock_total) == (side, stock_total + side, stock_total)
    assert s.modules == {"model.language_model.dpvr_side_branch": side}
    assert s.percent == pytest.approx(100 * side / (stock_total + side))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".dpvr_side_branch." in n
    ]

    s = mark_trainable(model, fusion_layers=True)
    assert s.trainable == side + 2 * layer
    assert list(s.modules) == ["model.language_model.dpvr_side_branch", "model.language_model.layers.4",
                               "model.language_model.layers.5"]
    s = mark_trainable(model, side_branch=False, fusion_layers=True)
    assert s.trainable == 2 * layer and not lm.dpvr_side_branch.self_attn.q_proj.weight.requires_grad
    assert "model.language_model.layers.5" in str(s)


def test_mark_trainable_llava_7b_on_meta():
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(named_config("llava-1.5-7b"))
    stock_total = sum(p.numel() for p in model.parameters())
    dpvr_kernels.patch(model)
    s = mark_trainable(model)
    assert s.trainable == 202_383_360
    assert s.modules == {"model.language_model.dpvr_side_branch": 202_383_360}
    assert s.stock_total == stock_total == 7_063_427_072
    assert s.total == stock_total + 202_383_360
    assert round(s.percent, 1) == 2.8 and round(s.stock_percent, 1) == 2.9
    text = str(s)
    assert "202,383,360" in text and "2.8%" in text and "2.9%" in text


# ------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    batch = _batch()
    weights = torch.randn(*batch["input_ids"].shape, 128, generator=torch.Generator().manual_seed(5))

    def trained_grads(checkpointing: bool):
        model = tiny_llava(layers=6)
        dpvr_kernels.patch(model)
        mark_trainable(model, fusion_layers=True)
        model.train()
        calls = []
        _lm(model).dpvr_side_branch.self_attn.register_forward_hook(lambda *a: calls.append(1))
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated alias of activation_checkpointing_enable
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        logits = model(**batch, use_cache=False).logits
        (logits * weights * batch["attention_mask"][..., None]).sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # the side branch is recomputed in the backward
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = trained_grads(False), trained_grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 9
    for name in plain:
        assert ckpt[name] is not None, name
        _assert_close_rel(ckpt[name], plain[name], 1e-6, name)


# ------------------------------------------------------------------------------------------ HF Trainer


class _Samples(torch.utils.data.Dataset):
    """Samples of one padded length; pixel_values ``[n_images, 3, 28, 28]`` (n may be 0)."""

    def __init__(self):
        batch = _batch()
        per_sample = [2, 0, 1]  # images of each LAYOUTS sample, in order
        starts = [0, 2, 2]
        self.items = []
        labels = _labels(batch["input_ids"], batch["attention_mask"])
        for b in range(3):
            self.items.append({
                "input_ids": batch["input_ids"][b],
                "attention_mask": batch["attention_mask"][b],
                "labels": labels[b],
                "pixel_values": batch["pixel_values"][starts[b] : starts[b] + per_sample[b]],
            })

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(items):
    out = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}
    pixels = torch.cat([it["pixel_values"] for it in items])
    if len(pixels):
        out["pixel_values"] = pixels
    return out


def test_hf_trainer_trains_the_side_branch(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llava(layers=6)
    dpvr_kernels.patch(model)
    mark_trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, logging_strategy="no")
    result = Trainer(model=model, args=args, train_dataset=_Samples(), data_collator=_collate).train()
    assert result.global_step == 2 and result.training_loss == result.training_loss  # not NaN
    for name, p in model.named_parameters():
        if ".dpvr_side_branch." in name:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert dpvr_kernels.is_patched(model)


# --------------------------------------------------------------------------------------------- example


def test_example_script_runs(tmp_path):
    path = os.path.join(ROOT, "examples", "distill_side_branch.py")
    spec = importlib.util.spec_from_file_location("distill_side_branch_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "3", "--batch-size", "3", "--hidden", "64", "--layers", "4",
                           "--eval-batches", "1", "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "out" / "loss_history.json") as f:
        saved = json.load(f)
    assert len(saved["loss_history"]) == 3 and saved["loss_history"] == result["loss_history"]
    assert saved["kl_before"] > 0 and saved["trainable"]["trainable"] > 0
