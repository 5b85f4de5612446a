"""Training the DPVR-LF side branch (and optionally the fusion layers), about 3% of the parameters.

The paper trains only the one-layer side branch that carries the image tokens past the route layer;
everything else stays frozen. Typical use, distilling a patched student from a stock teacher::

    dpvr_kernels.patch(model)
    print(mark_trainable(model))                 # side branch only; fusion_layers=True adds the last layer(s)
    history = distill_side_branch(model, None, batches, steps=200, lr=1e-4)   # teacher: the model's stock forward

The teacher is the same weights under the stock forward (:func:`dpvr_kernels.stock_forward`), not a copy.
``dpvr_kernels.distill`` runs this on LLaVA conversation data with the Hugging Face ``Trainer`` (DDP/FSDP,
gradient accumulation, bf16, checkpoints and resume); ``dpvr-kernels distill`` is its command line.

The patched model also trains with its own loss (``model(..., labels=labels)``), with the Hugging Face
``Trainer`` (which needs ``accelerate``) and with ``model.gradient_checkpointing_enable()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.backbone import SIDE_BRANCH, language_model
from .models.patching import is_patched, keep_stock_fusion_layers, stock_forward

__all__ = [
    "TrainableSummary",
    "answer_kl",
    "distill_side_branch",
    "distillation_kl",
    "distillation_loss",
    "mark_trainable",
]


@dataclass
class TrainableSummary:
    """What :func:`mark_trainable` left trainable.

    ``total`` counts the patched model (side branch included); ``stock_total`` the model without the side
    branch, which is the denominator the paper uses ("2.9% of LLaVA-1.5-7B"). Percentages are 0-100.
    ``modules`` maps each trainable module's name (as in ``model.named_modules()``) to its parameter count.
    """

    trainable: int
    total: int
    percent: float
    stock_total: int
    stock_percent: float
    modules: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.1f}% of the patched "
            f"model; {self.stock_percent:.1f}% of the stock model's {self.stock_total:,})"
        ]
        lines += [f"  {name}: {count:,}" for name, count in self.modules.items()]
        return "\n".join(lines)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mark_trainable(model: nn.Module, side_branch: bool = True, fusion_layers: bool = False) -> TrainableSummary:
    """Freeze every parameter of a patched model, then unfreeze the side branch (and the fusion layers).

    Args:
        model: a LLaVA model patched by :func:`dpvr_kernels.patch` (any device, ``meta`` included).
        side_branch: train ``model.model.language_model.dpvr_side_branch``.
        fusion_layers: also train the last ``config.dpvr["fusion_layers"]`` decoder layers. Their original
            weights are kept first (a frozen copy, one decoder layer each; :func:`~dpvr_kernels.models.patching.
            keep_stock_fusion_layers`), so the stock forward, the distillation teacher, stays the original model.

    Returns:
        A :class:`TrainableSummary`; ``print()`` it for a readable report.

    Raises:
        ValueError: if the model is not patched (there is no side branch to train yet).
    """
    if not is_patched(model):
        raise ValueError(
            f"{type(model).__name__} is not patched, so it has no DPVR-LF side branch to train: call "
            "dpvr_kernels.patch(model) first, then mark_trainable(model)"
        )
    lm = language_model(model)
    names = {id(module): name for name, module in model.named_modules()}
    chosen: list[nn.Module] = []
    if side_branch:
        chosen.append(getattr(lm, SIDE_BRANCH))
    if fusion_layers:
        f = int(model.config.dpvr["fusion_layers"])
        keep_stock_fusion_layers(model)
        chosen += list(lm.layers[len(lm.layers) - f :])

    for p in model.parameters():
        p.requires_grad_(False)
    for module in chosen:
        for p in module.parameters():
            p.requires_grad_(True)

    total = sum(p.numel() for p in model.parameters())  # parameters() skips shared (tied) tensors
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stock_total = total - _numel(getattr(lm, SIDE_BRANCH))
    return TrainableSummary(
        trainable=trainable,
        total=total,
        percent=100.0 * trainable / total,
        stock_total=stock_total,
        stock_percent=100.0 * trainable / stock_total,
        modules={names[id(m)]: _numel(m) for m in chosen},
    )


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, attention_mask: Tensor | None = None,
                      temperature: float = 1.0) -> Tensor:
    """Token-level ``KL(teacher || student)`` of the next-token distributions, mean over valid tokens.

    Args:
        student_logits, teacher_logits: ``[B, L, V]`` logits (any float dtype; computed in fp32).
        attention_mask: ``[B, L]``, 1 = valid token, 0 = pad (pad positions are dropped before the
            softmax, so whatever a model puts there, NaN included, plays no part). ``None``: all valid.
        temperature: both distributions are ``softmax(logits / temperature)``; the KL is multiplied by
            ``temperature ** 2`` so the gradient scale does not depend on it (Hinton et al., 2015).

    Returns:
        A scalar: ``sum_v p_t (log p_t - log p_s)`` averaged over the valid tokens.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: run both models on the same batch"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if attention_mask is not None:
        valid = attention_mask.to(student_logits.device).bool()
        if not valid.any():
            raise ValueError("attention_mask has no valid token: nothing to distil")
        student_logits, teacher_logits = student_logits[valid], teacher_logits[valid.to(teacher_logits.device)]
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(log_s.device).float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


def answer_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(teacher || student)`` at each position that predicts an answer token, ``[B, L-1]`` (zero elsewhere).

    ``labels`` are ``[B, L]`` with the answer tokens' ids and -100 elsewhere (as a causal LM's labels): the logits
    at position ``t`` predict token ``t + 1``, so the positions scored are those with ``labels[:, t + 1] != -100``.
    Sum it and divide by the answer-token count (``(labels[:, 1:] != -100).sum()``) for the mean. Computed in
    fp32; scaled by ``temperature ** 2`` as :func:`distillation_loss` is.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and labels {tuple(labels.shape)} must agree on [B, L]")
    where = (labels[:, 1:] != -100).to(student_logits.device)
    log_s = F.log_softmax(student_logits[:, :-1].float() / temperature, -1)
    log_t = F.log_softmax(teacher_logits[:, :-1].to(log_s.device).float() / temperature, -1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1) * temperature**2
    return torch.where(where, kl, torch.zeros_like(kl))


def _model_inputs(batch: Mapping[str, Tensor | None], device: torch.device) -> dict[str, Tensor]:
    keys = ("input_ids", "attention_mask", "pixel_values", "position_ids")
    return {k: batch[k].to(device) for k in keys if batch.get(k) is not None}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, batch: Mapping[str, Tensor | None]) -> Tensor:
    return model(**_model_inputs(batch, _device(model)), use_cache=False).logits


def _teacher_logits(model: nn.Module, teacher: nn.Module | None, batch: Mapping[str, Tensor | None]) -> Tensor:
    if teacher is not None:
        return _logits(teacher, batch)
    with stock_forward(model):
        return _logits(model, batch)


def _cycle(batches: Iterable[Mapping[str, Tensor]]) -> Iterator[Mapping[str, Tensor]]:
    """Repeat a re-iterable ``batches`` (a list, a DataLoader); a one-shot iterator must hold enough."""
    while True:
        seen = False
        for batch in batches:
            seen = True
            yield batch
        if not seen:
            raise ValueError("batches ran out (or is empty): pass a list or DataLoader, or one batch per step")


@torch.no_grad()
def distillation_kl(model: nn.Module, teacher: nn.Module | None, batches: Iterable[Mapping[str, Tensor]],
                    temperature: float = 1.0) -> float:
    """Mean :func:`distillation_loss` of ``model`` against ``teacher`` over ``batches`` (no gradients);
    ``teacher=None``: the model's own stock forward."""
    losses = []
    for batch in batches:
        mask = batch.get("attention_mask")
        target = _teacher_logits(model, teacher, batch)
        losses.append(float(distillation_loss(_logits(model, batch), target, mask, temperature)))
    if not losses:
        raise ValueError("batches is empty")
    return sum(losses) / len(losses)


def distill_side_branch(
    model: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Mapping[str, Tensor]],
    steps: int,
    lr: float,
    *,
    fusion_layers: bool = False,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    progress: bool = False,
) -> list[float]:
    """Distil a patched model (student) from its stock copy (teacher), training the side branch only.

    Calls :func:`mark_trainable` (so everything else is frozen), then runs ``steps`` AdamW steps on
    :func:`distillation_loss` between the student's and the teacher's logits, on the valid tokens.

    Args:
        model: the patched student. Left in the train/eval mode it had on entry.
        teacher: ``None`` (recommended): the model's own stock forward is the teacher
            (:func:`dpvr_kernels.stock_forward`, no second copy of the weights). Or a separate stock model with
            the same weights (``copy.deepcopy(model)`` before ``patch``). Run in eval mode without gradients.
        batches: dicts with ``input_ids``, ``attention_mask`` and (optionally) ``pixel_values``,
            ``position_ids``; cycled if there are fewer than ``steps``.
        steps, lr: optimizer steps and AdamW learning rate.
        fusion_layers: also train the fusion layer(s) (see :func:`mark_trainable`).
        temperature: distillation temperature (see :func:`distillation_loss`).
        weight_decay: AdamW weight decay on the trained parameters.
        max_grad_norm: clip the gradient norm of the trained parameters (``None``: no clipping).
        progress: show a tqdm progress bar (needs ``tqdm``).

    Returns:
        The loss of every step (before that step's update), as floats.
    """
    if teacher is model:
        raise ValueError("teacher=model would distil the student from itself: pass teacher=None to use the model's "
                         "own stock forward as the teacher (dpvr_kernels.stock_forward), or a separate stock copy")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mark_trainable(model, side_branch=True, fusion_layers=fusion_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if teacher is not None:
        teacher.eval()
    was_training = model.training
    model.train()
    step_iter: Iterable[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm

        step_iter = tqdm(step_iter, desc="distilling side branch", unit="step")
    history: list[float] = []
    data = _cycle(batches)
    try:
        for _ in step_iter:
            batch = next(data)
            with torch.no_grad():
                target = _teacher_logits(model, teacher, batch)
            loss = distillation_loss(_logits(model, batch), target, batch.get("attention_mask"), temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            history.append(loss.item())
            if progress:
                step_iter.set_postfix(kl=f"{history[-1]:.4g}")
    finally:
        model.train(was_training)
    return history
