"""One rank of the multi-process tests (launched by dist_util.run_ranks, or by hand with torchrun):

    python dist_worker.py tp    OUT MODEL_DIR   # tensor parallel: logits, greedy generate, save + reload a side branch
    python dist_worker.py tp_mrope OUT MODEL_DIR  # the same logits and generate for an M-RoPE class (Qwen2.5-VL)
    python dist_worker.py ddp   OUT MODEL_DIR   # HF Trainer under DDP: losses and side-branch weights
    python dist_worker.py fsdp  OUT MODEL_DIR   # FSDP2 fully_shard, a plain training loop
    python dist_worker.py distill OUT MODEL_DIR DATA  # dpvr_kernels.distill (the Trainer) under DDP -> OUT/out

Results go to OUT as torch.save files of rank 0; the test compares them with a single-process run. The process
group is destroyed at the end of every mode.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import IMAGE_TOKEN, make_batch  # noqa: E402

import dpvr_kernels  # noqa: E402
from dpvr_kernels.training import mark_trainable  # noqa: E402

# A global batch of four samples (two per rank): two images in one sample, none in another, left padding.
TRAIN_LAYOUTS = [["T", "I", "T", "T", "I"], ["T", "T", "T", "T", "T", "T"], ["I", "T", "T", "T"], ["T", "T", "I", "T"]]
IMAGES = [2, 0, 1, 1]
INFER_LAYOUTS = [["T", "I", "T", "T"], ["T", "T", "T", "I"], ["I"]]
STEPS, LR = 3, 1e-3


def infer_inputs() -> dict:
    ids, mask, px = make_batch(INFER_LAYOUTS, seed=1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px}


def labels_for(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    first = attention_mask.cumsum(-1) == 1
    return input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_TOKEN) | first, -100)


def train_samples() -> list[dict]:
    ids, mask, px = make_batch(TRAIN_LAYOUTS, seed=2)
    labels = labels_for(ids, mask)
    starts = [sum(IMAGES[:b]) for b in range(len(IMAGES))]
    return [{"input_ids": ids[b], "attention_mask": mask[b], "labels": labels[b],
             "pixel_values": px[starts[b] : starts[b] + IMAGES[b]]} for b in range(len(IMAGES))]


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}
    pixels = torch.cat([it["pixel_values"] for it in items])
    if len(pixels):
        out["pixel_values"] = pixels
    return out


def side_state(model) -> dict[str, torch.Tensor]:
    """Full side-branch tensors (gathered from DTensor shards: every rank must call this)."""
    out = {}
    for name, p in model.model.language_model.dpvr_side_branch.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def load_patched(model_dir: str, **kwargs):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, **kwargs).eval()
    return dpvr_kernels.patch(model)


def logits_and_tokens(model) -> tuple[torch.Tensor, torch.Tensor]:
    batch = infer_inputs()
    with torch.no_grad():
        logits = model(**batch).logits
    tokens = model.generate(**batch, max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    return logits, tokens


def mrope_logits_and_tokens(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and 5 greedy tokens of a Qwen2.5-VL on images of three sizes, a video and a text-only sample."""
    from qwen_models import LAYOUTS, qwen_batch

    batch = qwen_batch(model, LAYOUTS, seed=1)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
    return logits, tokens


def load_mrope(model_dir: str, **kwargs):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs).eval()
    return dpvr_kernels.patch(model, route_layer=2)


# --------------------------------------------------------------------------------------------------- modes


def run_tp_mrope(out: Path, model_dir: str) -> None:
    """An M-RoPE model (3-row positions per token in both streams) under tensor parallelism."""
    model = load_mrope(model_dir, tp_plan="auto")
    q = model.model.language_model.dpvr_side_branch.self_attn.q_proj.weight
    logits, tokens = mrope_logits_and_tokens(model)
    if dist.get_rank() == 0:
        torch.save({"placements": str(q.placements), "logits": logits, "tokens": tokens}, out / "tp_mrope.pt")


def run_tp(out: Path, model_dir: str) -> None:
    """Patch a TP-loaded model, run it, train-free perturb its side branch, save, reload under TP and patch."""
    model = load_patched(model_dir, tp_plan="auto")
    rank = dist.get_rank()
    lm = model.model.language_model
    side, r = lm.dpvr_side_branch, model.config.dpvr["route_layer"]
    q = side.self_attn.q_proj.weight
    layer_q = lm.layers[r].self_attn.q_proj.weight
    info = {"placements": str(q.placements), "local_shape": tuple(q.to_local().shape), "global_shape": tuple(q.shape),
            "local_equal_layer_r": torch.equal(q.to_local(), layer_q.to_local()),
            "shares_storage": q.to_local().data_ptr() == layer_q.to_local().data_ptr()}
    logits, tokens = logits_and_tokens(model)
    # A side branch that differs from layer r, as after training: scale every tensor (shard-wise, exact).
    with torch.no_grad():
        for p in side.parameters():
            p.mul_(1.5)
    saved_dir = out / "patched_tp_checkpoint"
    model.save_pretrained(saved_dir)
    dist.barrier()
    trained_side = side_state(model)
    reloaded = load_patched(str(saved_dir), tp_plan="auto")
    reloaded_logits, _ = logits_and_tokens(reloaded)
    reloaded_side = side_state(reloaded)
    if rank == 0:
        torch.save({"info": info, "logits": logits, "tokens": tokens, "trained_side": trained_side,
                    "reloaded_side": reloaded_side, "reloaded_logits": reloaded_logits}, out / "tp.pt")


def train_with_trainer(model_dir: str, out_dir: Path, per_device_batch: int) -> tuple[list[float], dict, str]:
    """The HF Trainer on the side branch: labels loss, AdamW, STEPS steps over the global batch of four samples."""
    from transformers import Trainer, TrainingArguments

    model = load_patched(model_dir)
    mark_trainable(model)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=per_device_batch,
                             learning_rate=LR, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="no", remove_unused_columns=False, disable_tqdm=True, logging_steps=1,
                             dataloader_drop_last=True, seed=0, average_tokens_across_devices=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_samples(), data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, side_state(model), type(trainer.model_wrapped).__name__


def run_ddp(out: Path, model_dir: str) -> None:
    losses, side, wrapper = train_with_trainer(model_dir, out / "trainer", per_device_batch=len(TRAIN_LAYOUTS) // 2)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "side": side, "world": dist.get_world_size(), "wrapper": wrapper},
                   out / "ddp.pt")


def global_loss(model, batch: dict, num_tokens: int) -> torch.Tensor:
    """Sum of the next-token cross entropies of ``batch`` over the global count of label tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch.get("pixel_values"), use_cache=False).logits
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum") / num_tokens


def train_loop(model, batch: dict, num_tokens: int, world: int) -> list[float]:
    """STEPS AdamW steps; each rank's loss is scaled by ``world`` (the data-parallel gradient is a mean)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = global_loss(model, batch, num_tokens)
        optimizer.zero_grad()
        (loss * world).backward()
        optimizer.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def run_fsdp(out: Path, model_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    samples = train_samples()
    num_tokens = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    per_rank = len(samples) // world
    batch = collate(samples[rank * per_rank : (rank + 1) * per_rank])
    model = load_patched(model_dir)
    mark_trainable(model)
    model.train()
    lm = model.model.language_model
    # FSDP2 after the patch: the trainable side branch is one unit; the frozen decoder layers are sharded too.
    refused = ""
    for layer in lm.layers:
        fully_shard(layer)
    try:
        dpvr_kernels.unpatch(model)
        dpvr_kernels.patch(model)
    except NotImplementedError as err:  # patching after fully_shard must be refused with a clear error
        refused = str(err)
        model = load_patched(model_dir)
        mark_trainable(model)
        model.train()
        lm = model.model.language_model
        for layer in lm.layers:
            fully_shard(layer)
    fully_shard(lm.dpvr_side_branch)
    fully_shard(model)
    losses = train_loop(model, batch, num_tokens, world)
    side = side_state(model)
    if rank == 0:
        torch.save({"losses": losses, "side": side, "refused": refused}, out / "fsdp.pt")


def run_distill(out: Path, model_dir: str) -> None:
    """Three distill steps, two records per rank; images under MODEL_DIR/data (test_distill.py's folder)."""
    from dpvr_kernels.distill import distill

    distill(model_dir, sys.argv[4], Path(model_dir) / "data", out / "out", route_layer=2, max_steps=3, lr=3e-3,
            batch_size=2, progress=False, warmup=0)


def main() -> None:
    mode, out, model_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    if mode not in ("tp", "tp_mrope"):  # from_pretrained(tp_plan=...) starts the process group itself
        dist.init_process_group("gloo")
    try:
        {"tp": run_tp, "tp_mrope": run_tp_mrope, "ddp": run_ddp, "fsdp": run_fsdp,
         "distill": run_distill}[mode](out, model_dir)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
