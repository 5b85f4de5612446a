"""DPVR-LF on several GPUs (or CPU processes): tensor-parallel inference, DDP/FSDP2 training of the side branch.

Every command runs as one process too (then without parallelism); under ``torchrun`` each process is one rank
(NCCL on GPUs, gloo on CPU). No download: ``make-model`` writes a small LLaVA with random weights.

    python examples/several_gpus.py make-model demo_llava                       # a model folder to try it on
    torchrun --nproc_per_node 2 examples/several_gpus.py infer demo_llava       # tensor parallel (tp_plan="auto")
    torchrun --nproc_per_node 2 examples/several_gpus.py train demo_llava --out trained        # DDP
    torchrun --nproc_per_node 2 examples/several_gpus.py train demo_llava --fsdp --out trained # FSDP2
    torchrun --nproc_per_node 2 examples/several_gpus.py train demo_llava --trainer --out trained  # HF Trainer (DDP)

``infer`` loads with ``from_pretrained(path, tp_plan="auto")``: each rank holds half of every attention and MLP
projection, and ``dpvr_kernels.patch`` gives the side branch the same sharding. ``train`` patches first, then
freezes all but the side branch (``mark_trainable``), then wraps: DDP, or FSDP2 ``fully_shard`` on every decoder
layer, the side branch and the model. Each rank trains on its share of every global batch; ``--out`` is a
checkpoint that ``from_pretrained`` + ``dpvr_kernels.patch`` restores with the trained side branch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import dpvr_kernels
from dpvr_kernels.training import mark_trainable

IMAGE_SIZE, PATCH = 56, 14  # 16 image tokens per image


def make_model(path: str, seed: int = 0) -> None:
    """A small LLaVA (Llama decoder: 8 layers, 4 query / 2 KV heads, divisible by 2 ranks) with random weights."""
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=511,
                      image_seq_length=(IMAGE_SIZE // PATCH) ** 2, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    print(f"wrote a random-weight LLaVA to {path}")


def synthetic_batch(config, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Left-padded prompts, one image each (at a random place), random text around it."""
    token, per_image = config.image_token_id, config.image_seq_length
    rows = []
    for _ in range(batch_size):
        text = torch.randint(1, token, (int(torch.randint(4, 12, (1,), generator=generator)),), generator=generator)
        at = int(torch.randint(0, len(text) + 1, (1,), generator=generator))
        rows.append(text[:at].tolist() + [token] * per_image + text[at:].tolist())
    length = max(map(len, rows))
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = torch.tensor(row), 1
    pixels = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = ids.masked_fill((mask == 0) | (ids == token), -100)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def infer(path: str, max_new_tokens: int) -> torch.Tensor:
    """Tensor-parallel greedy generation under torchrun (one process: the plain model)."""
    tp = {"tp_plan": "auto"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    model = LlavaForConditionalGeneration.from_pretrained(path, **tp).eval()
    dpvr_kernels.patch(model)
    batch = synthetic_batch(model.config, 2, torch.Generator().manual_seed(1))
    batch.pop("labels")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            suppress_tokens=[model.config.image_token_id])
    rank, world = rank_world()
    if rank == 0:
        print(dpvr_kernels.describe(model))
        print(f"{world} rank(s); new tokens:\n{tokens[:, batch['input_ids'].shape[1]:]}")
    return tokens


def _loss(model, batch: dict, num_tokens: int) -> torch.Tensor:
    """Next-token cross entropy summed over this rank's tokens, divided by the global token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum") / num_tokens


def _shard(batch: dict, rank: int, world: int) -> dict:
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def train(path: str, out: str | None, steps: int, global_batch: int, lr: float, fsdp: bool) -> list[float]:
    """Train the side branch with DDP or FSDP2; every rank sees its share of the same global batches."""
    rank, world = rank_world()
    if global_batch % world:
        raise SystemExit(f"--global-batch {global_batch} must be divisible by the {world} ranks")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(path).to(device))
    summary = mark_trainable(model)
    if rank == 0:
        print(summary)
    model.train()
    if world > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        lm = model.model.language_model
        for module in [*lm.layers, lm.dpvr_side_branch]:
            fully_shard(module)
        wrapped = fully_shard(model)
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = model
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(0)  # same global batches on every rank
    losses = []
    for step in range(steps):
        batch = synthetic_batch(model.config, global_batch, generator)
        num_tokens = int((batch["labels"][:, 1:] != -100).sum())
        local = {k: v.to(device) for k, v in _shard(batch, rank, world).items()}
        loss = _loss(wrapped, local, num_tokens)
        optimizer.zero_grad()
        (loss * world).backward()  # DDP and FSDP average the gradients over the ranks
        optimizer.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
        if rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.5f}")
    if out:
        save(model, out, fsdp and world > 1)
    return losses


def save(model, out: str, fsdp: bool) -> None:
    """save_pretrained of the trained model (side branch and config.dpvr included), written by rank 0."""
    rank, _ = rank_world()
    state = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
        print(f"saved to {out}")
    if dist.is_initialized():
        dist.barrier()


def train_with_trainer(path: str, out: str | None, steps: int, global_batch: int, lr: float) -> list[float]:
    """The same with the Hugging Face Trainer (DDP under torchrun; ``accelerate launch`` works too)."""
    from transformers import Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(path))
    mark_trainable(model)
    # one padded length for all samples: the Trainer shuffles them into batches
    batch = synthetic_batch(model.config, steps * global_batch, torch.Generator().manual_seed(0))
    samples = [{k: (v[b : b + 1] if k == "pixel_values" else v[b]) for k, v in batch.items()}
               for b in range(steps * global_batch)]

    def collate(items: list[dict]) -> dict:
        out = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}
        return out | {"pixel_values": torch.cat([it["pixel_values"] for it in items])}

    args = TrainingArguments(output_dir=out or "trainer_out", max_steps=steps, learning_rate=lr,
                             per_device_train_batch_size=global_batch // world, remove_unused_columns=False,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(),
                             average_tokens_across_devices=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate)
    trainer.train()
    if out:
        trainer.save_model(out)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-model", help="write a small random-weight LLaVA folder")
    mk.add_argument("path")
    inf = sub.add_parser("infer", help="greedy generation (tensor parallel under torchrun)")
    inf.add_argument("path")
    inf.add_argument("--max-new-tokens", type=int, default=8)
    tr = sub.add_parser("train", help="train the side branch (DDP, --fsdp, or --trainer)")
    tr.add_argument("path")
    tr.add_argument("--out", default=None, help="save the trained model here")
    tr.add_argument("--steps", type=int, default=5)
    tr.add_argument("--global-batch", type=int, default=4, help="samples per step over all ranks")
    tr.add_argument("--lr", type=float, default=1e-3)
    mode = tr.add_mutually_exclusive_group()
    mode.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    mode.add_argument("--trainer", action="store_true", help="the Hugging Face Trainer (DDP)")
    args = p.parse_args(argv)

    if args.command == "make-model":
        make_model(args.path)
        return
    if args.command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.trainer:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        if args.command == "infer":
            infer(args.path, args.max_new_tokens)
        elif args.trainer:
            train_with_trainer(args.path, args.out, args.steps, args.global_batch, args.lr)
        else:
            train(args.path, args.out, args.steps, args.global_batch, args.lr, args.fsdp)
        if dist.is_initialized():
            dist.barrier()  # every rank done before the group goes away (gloo aborts a rank whose peer left first)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
