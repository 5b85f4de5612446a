"""Side-branch distillation on LLaVA conversation data, built on the Hugging Face ``Trainer``.

The student is the patched model (DPVR-LF forward); the teacher is **the same weights under the stock forward**
(:func:`dpvr_kernels.stock_forward`), so no second copy of the model is held. The loss is ``KL(teacher ||
student)`` on the answer tokens (plus an optional LM loss on them), summed and divided by the answer-token count
of the whole optimizer step (across gradient-accumulation steps and ranks), so one process, DDP and gradient
accumulation give the same update. Only the side branch (optionally the fusion layers) trains; where the fusion
layers train, the teacher computes with a kept copy of their original weights, so it stays the original model.

Everything else comes from ``Trainer``: DDP/FSDP under ``torchrun`` or ``accelerate launch``, gradient
accumulation, bf16, checkpoints and ``resume_from_checkpoint``, logging and the progress bar. Checkpoints hold
the trained tensors only (the frozen weights are in the base folder already). ``dpvr-kernels distill`` is the
command line of :func:`distill`.

Output, by :func:`save_distilled`: a folder that ``from_pretrained`` + ``patch()`` restores (the model, its
side branch, ``config.dpvr`` and the processor), or with ``side_branch_only`` just the trained tensors and the
settings (``dpvr_side_branch.safetensors`` + ``dpvr_side_branch.json``), which :func:`load_side_branch`
applies to the base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from .conversations import DataError, Example, collate, encode, image_names, load_records, read_images
from .models.backbone import SIDE_BRANCH, side_branch
from .models.patching import is_patched, keep_stock_fusion_layers, patch, stock_forward
from .training import answer_kl, mark_trainable

__all__ = [
    "SIDE_BRANCH_FILE",
    "SIDE_BRANCH_SETTINGS",
    "ConversationDataset",
    "DistillTrainer",
    "load_side_branch",
    "save_distilled",
    "trained_state",
]

SIDE_BRANCH_FILE = "dpvr_side_branch.safetensors"
SIDE_BRANCH_SETTINGS = "dpvr_side_branch.json"


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA conversation records encoded through ``processor`` (lazily, one record per item).

    Every record is checked up front (structure, placeholders against images, image files exist and open as
    images), so a bad record fails before training starts, with a :class:`~dpvr_kernels.conversations.DataError`
    that names it.
    """

    def __init__(self, processor: Any, records: Sequence[dict[str, Any]] | str | os.PathLike,
                 image_folder: str | os.PathLike) -> None:
        from PIL import Image, UnidentifiedImageError

        self.processor = processor
        self.records = load_records(records) if isinstance(records, (str, os.PathLike)) else list(records)
        self.image_folder = Path(image_folder)
        for i, record in enumerate(self.records):
            for name in image_names(record):
                path = self.image_folder / name
                if not path.is_file():
                    raise DataError(f"record {i}{_id(record)}: image file {path} not found; check --image-folder "
                                    "and the record's 'image'")
                try:
                    with Image.open(path) as img:
                        img.verify()
                except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                    raise DataError(f"record {i}{_id(record)}: image file {path} is not an image PIL can read "
                                    f"({exc}); replace it or drop the record") from exc

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        record = self.records[index]
        return encode(self.processor, record, read_images(index, record, self.image_folder), index)


def _id(record: dict[str, Any]) -> str:
    return f" (id {record['id']!r})" if isinstance(record, dict) and record.get("id") is not None else ""


@dataclass
class Collator:
    """Right-padded batches of :class:`~dpvr_kernels.conversations.Example` (a ``Trainer`` data collator)."""

    pad_id: int

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        return collate(examples, self.pad_id)


class DistillTrainer(Trainer):
    """``Trainer`` whose loss is ``KL(stock || DPVR-LF)`` on the answer tokens (+ ``lm_weight`` x LM loss).

    The model must be patched, with :func:`~dpvr_kernels.mark_trainable` applied. The teacher runs the same
    (wrapped) model inside :func:`~dpvr_kernels.stock_forward` without gradients, so DDP and FSDP wrappers see
    the usual calls. The loss is normalised by ``num_items_in_batch`` (the answer tokens of the optimizer step,
    summed over ranks), as the Trainer does for causal-LM losses.
    """

    def __init__(self, *args: Any, lm_weight: float = 0.0, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not is_patched(self.accelerator.unwrap_model(self.model)):
            raise ValueError("DistillTrainer needs a patched model: dpvr_kernels.patch(model) and "
                             "dpvr_kernels.mark_trainable(model) first")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if self.is_fsdp_enabled and any(
                p.requires_grad for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                if SIDE_BRANCH not in n):
            raise ValueError("training the fusion layers under FSDP is not supported (the teacher swaps in their "
                             "original weights, which FSDP's flat parameters do not allow): use DDP, or train the "
                             "side branch only")
        self.lm_weight, self.temperature = lm_weight, temperature
        # The loss below sums over answer tokens and divides by the step's count: tell the Trainer to count them
        # (labels[:, 1:] != -100, gathered over ranks) and not to divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        labels = inputs.pop("labels")
        with torch.no_grad(), stock_forward(self.accelerator.unwrap_model(model)):
            teacher = model(**inputs, use_cache=False).logits
        outputs = model(**inputs, use_cache=False)
        loss = answer_kl(outputs.logits, teacher, labels, self.temperature).sum()
        if self.lm_weight:
            targets = labels[:, 1:].to(outputs.logits.device)
            lm = F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                 reduction="sum")
            loss = loss + self.lm_weight * lm
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global already
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the trained tensors only (and ``config.json`` with ``config.dpvr``): resume loads them
        over the model it starts from, which already has every frozen weight."""
        model = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        # Under the module's own names (save_pretrained may rewrite prefixes), which resume's
        # model.load_state_dict(..., strict=False) matches.
        save_file(trained_state(model), os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries of the parameters that train (``requires_grad``), detached, on CPU."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def save_distilled(model: nn.Module, out: str | os.PathLike, processor: Any | None = None,
                   side_branch_only: bool = False, base_model: str | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write a distilled model.

    Args:
        model: the patched model after distillation.
        out: folder to write.
        processor: saved next to the model (not with ``side_branch_only``).
        side_branch_only: write only the side branch (and the fusion layers where they trained) as
            ``dpvr_side_branch.safetensors`` with the settings in ``dpvr_side_branch.json``; apply with
            :func:`load_side_branch` on the base model. Otherwise the whole model with ``save_pretrained``, which
            ``from_pretrained`` + :func:`~dpvr_kernels.patch` restores.
        base_model: recorded in the settings (where the frozen weights come from).
        extra: more fields for ``dpvr_side_branch.json`` (e.g. the distillation settings).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(model.config.dpvr)
    if not side_branch_only:
        model.save_pretrained(out)
        if processor is not None:
            processor.save_pretrained(out)
        return out
    lm_prefix = _side_branch_prefix(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(lm_prefix)}
    fusion = [k for k, p in model.named_parameters() if p.requires_grad and not k.startswith(lm_prefix)]
    state.update({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in fusion})
    save_file(state, str(out / SIDE_BRANCH_FILE), metadata={"format": "pt"})
    info = {"dpvr": settings, "model_type": model.config.model_type, "base_model": base_model,
            "tensors": len(state), "fusion_layers_trained": bool(fusion), **(extra or {})}
    (out / SIDE_BRANCH_SETTINGS).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _side_branch_prefix(model: nn.Module) -> str:
    side = side_branch(model)
    return next(name for name, module in model.named_modules() if module is side) + "."


def load_side_branch(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a side-branch-only folder (:func:`save_distilled` with ``side_branch_only``) to a base model: patch
    it with the saved settings and load the trained tensors. Where the folder holds trained fusion layers, the
    base's are kept for :func:`~dpvr_kernels.stock_forward`. Returns ``model``.

    Raises:
        FileNotFoundError: ``path`` has no ``dpvr_side_branch.json``/``.safetensors``.
        ValueError: the tensors do not fit this model (another base, or another route layer).
    """
    from safetensors.torch import load_file

    path = Path(path)
    settings_file, tensors_file = path / SIDE_BRANCH_SETTINGS, path / SIDE_BRANCH_FILE
    if not settings_file.is_file() or not tensors_file.is_file():
        raise FileNotFoundError(f"{path} has no {SIDE_BRANCH_SETTINGS} and {SIDE_BRANCH_FILE}: pass a folder written "
                                "by `dpvr-kernels distill --side-branch-only` (a full folder loads with "
                                "from_pretrained + dpvr_kernels.patch)")
    info = json.loads(settings_file.read_text())
    if getattr(model.config, "model_type", None) != info.get("model_type"):
        raise ValueError(f"{path} was distilled for a {info.get('model_type')!r} model, not "
                         f"{model.config.model_type!r}; load it onto its base model ({info.get('base_model')})")
    dpvr = info["dpvr"]
    if is_patched(model):
        if dict(model.config.dpvr) != dpvr:
            raise ValueError(f"model is patched with {model.config.dpvr}, the side branch in {path} with {dpvr}: "
                             "call dpvr_kernels.unpatch(model) first")
    else:
        patch(model, route_layer=dpvr["route_layer"], fusion_layers=dpvr["fusion_layers"],
              backend=dpvr.get("backend", "auto"))
    state = load_file(str(tensors_file))
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensor(s) of {path} do not fit this model (e.g. {wrong[0]}): it was "
                         f"distilled for another base model ({info.get('base_model')})")
    missing = [k for k in own if k.startswith(_side_branch_prefix(model)) and k not in state]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} side-branch tensor(s) (e.g. {missing[0]}); re-run distill")
    if any(not k.startswith(_side_branch_prefix(model)) for k in state):
        # The fusion layers trained too: keep the base's, so stock_forward (eval's stock row, a further
        # distillation's teacher) is still the base model.
        keep_stock_fusion_layers(model)
    model.load_state_dict(state, strict=False)
    return model


def prepare_student(model: nn.Module, route_layer: int | None, fusion_layers: int, train_fusion: bool):
    """Patch (unless already patched at these settings) and freeze all but the side branch (and fusion layers)."""
    if is_patched(model):
        current = model.config.dpvr
        if route_layer is not None and (current["route_layer"], current["fusion_layers"]) != (route_layer,
                                                                                             fusion_layers):
            raise ValueError(f"the model is patched at {current}; its side branch was trained there. Distil a new "
                             f"route layer from the stock folder instead")
    else:
        patch(model, route_layer=route_layer, fusion_layers=fusion_layers)
    return mark_trainable(model, side_branch=True, fusion_layers=train_fusion)


@dataclass
class DistillResult:
    """What :func:`distill` did: where it wrote, steps, seconds, and the held-out KL before and after."""

    out: Path
    steps: int
    """The global step reached (a resumed run counts the checkpoint's steps too)."""
    steps_run: int
    """Optimizer steps this call ran (fewer than ``steps`` after ``resume``)."""
    seconds: float
    trainable: int
    trainable_percent: float
    train_loss: float
    held_out_kl_before: float | None = None
    held_out_kl_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def distill(model_dir: str | os.PathLike, data: str | os.PathLike, image_folder: str | os.PathLike,
            out: str | os.PathLike, route_layer: int | None = None, fusion_layers: int = 1, *,
            train_fusion: bool = False, lm_weight: float = 0.0, temperature: float = 1.0, max_steps: int = -1,
            epochs: float = 1.0, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-4,
            warmup: float = 0.05, weight_decay: float = 0.0, bf16: bool = False, save_steps: int | None = None,
            resume: bool = False, side_branch_only: bool = False, seed: int = 0, logging_steps: int = 10,
            eval_data: str | os.PathLike | None = None, eval_image_folder: str | os.PathLike | None = None,
            progress: bool = True, trainer_args: dict[str, Any] | None = None) -> DistillResult:
    """Distil the side branch of the model in ``model_dir`` on conversation ``data`` and write it to ``out``.

    The Trainer's checkpoints go to ``out/checkpoints`` (every ``save_steps``; trained tensors only); ``resume``
    continues from the last of them (optimizer, scheduler, RNG and data position included). ``eval_data``
    (same format; its images under ``eval_image_folder``, default ``image_folder``) is scored before and after:
    the mean KL(stock || DPVR-LF) per answer token. ``trainer_args``
    override any other ``TrainingArguments`` field. Returns a :class:`DistillResult`; the folder gets
    ``distill.json`` with the settings and results.
    """
    import time

    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    class StepCounter(TrainerCallback):
        steps = 0

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1

    out = Path(out)
    checkpoints = out / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {checkpoints}; run without --resume first (with "
                                "--save-steps N to write checkpoints)")
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    train_set = ConversationDataset(processor, data, image_folder)
    eval_set = ConversationDataset(processor, eval_data, eval_image_folder or image_folder) if eval_data is not None else None
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    summary = prepare_student(model, route_layer, fusion_layers, train_fusion)
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = processor.tokenizer.eos_token_id
    args = dict(output_dir=str(checkpoints), max_steps=max_steps, num_train_epochs=epochs,
                per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                gradient_accumulation_steps=grad_accum, learning_rate=lr, warmup_steps=warmup,
                weight_decay=weight_decay, lr_scheduler_type="cosine", bf16=bf16, seed=seed, data_seed=seed,
                logging_steps=logging_steps, save_strategy="steps" if save_steps else "no",
                save_steps=save_steps or 500, report_to=[], remove_unused_columns=False,
                disable_tqdm=not progress, average_tokens_across_devices=True, use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, max_grad_norm=1.0)
    args.update(trainer_args or {})
    trainer = DistillTrainer(model=model, args=TrainingArguments(**args), train_dataset=train_set,
                             eval_dataset=eval_set, data_collator=Collator(pad), lm_weight=lm_weight,
                             temperature=temperature)
    counter = StepCounter()
    trainer.add_callback(counter)
    before = trainer.evaluate()["eval_loss"] if eval_set is not None and last is None else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    model = trainer.accelerator.unwrap_model(trainer.model)
    outcome = DistillResult(out, trainer.state.global_step, counter.steps, seconds, summary.trainable, summary.stock_percent,
                            float(result.training_loss), before, after)
    if trainer.args.should_save:
        settings = {"data": str(data), "route_layer": model.config.dpvr["route_layer"],
                    "fusion_layers": model.config.dpvr["fusion_layers"], "train_fusion": train_fusion,
                    "lm_weight": lm_weight, "temperature": temperature, "lr": lr, "batch_size": batch_size,
                    "grad_accum": grad_accum, "world_size": trainer.args.world_size, "seed": seed,
                    "resumed_from": last}
        save_distilled(model, out, processor, side_branch_only, base_model=str(model_dir),
                       extra={"distill": settings})
        (out / "distill.json").write_text(json.dumps({"settings": settings, "result": outcome.as_dict()},
                                                     indent=2) + "\n")
    return outcome
