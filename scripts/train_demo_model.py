"""Train the shipped demo model: a small LLaVA that reads real handwritten digits (dpvr_kernels/digit_grids.py).

    python scripts/train_demo_model.py --out dpvr_kernels/data/demo        # ~25 min on 2 CPU cores

A ``LlavaForConditionalGeneration`` from random init: a CLIP vision tower (3 layers x 128, patch 14, 56 px: 16
image tokens per grid, 4 per digit), LLaVA's two-layer projector and a Llama decoder (8 layers x 192, GQA 6:2).
LLaVA's recipe in miniature, with a fixed seed:

1. *Tower pre-training*: the tower alone learns to name each of the grid's four digits (mean of the cell's
   patch features -> a linear head) on augmented training digits (97.5 % of held-out digits in ~1.5 min).
   Joint training from scratch leaves the position questions near chance.
2. *Instruction tuning*, tower frozen (as LLaVA freezes its CLIP tower): projector and decoder on grid questions,
   loss on the answer tokens (answer + ``</s>``), digits augmented (small rotations, scaling, shifts). The first
   20 % of the steps ask only "what is the digit at ..." (a curriculum): learning to find a cell is the hard
   part, and with all five question types mixed from the start it did not happen within 1,000 steps; with the
   curriculum it happens after ~600, and the other types follow within ~1,500 more.

Writes the model, its word-level tokenizer, chat template and processor with ``save_pretrained`` (so
``AutoProcessor`` and ``AutoModelForImageTextToText`` load the folder offline), and ``training.json`` with the
settings, the loss curve and the held-out accuracy. Only training digits (the first 400 of each class) are
seen here; the held-out grids use the other 100.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dpvr_kernels import digit_grids as grids
from dpvr_kernels.evaluation import grid_accuracy

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endif %}{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]


def build_processor(image_size: int, patch: int) -> LlavaProcessor:
    """Word-level tokenizer (lower-cased, punctuation split off) over the grammar, CLIP image processor, chat
    template; ``<image>`` expands to one token per patch."""
    words = ["user", "assistant", ":", *grids.vocabulary()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                          patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(tokenizer, args: argparse.Namespace) -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=args.tower_hidden, intermediate_size=4 * args.tower_hidden,
                              num_hidden_layers=args.tower_layers, num_attention_heads=4, image_size=grids.GRID_SIZE,
                              patch_size=args.patch)
    config = LlavaConfig(text_config=text, vision_config=vision,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


class Pixels:
    """Grids -> the processor's pixel values, batched in torch (checked against the processor once)."""

    def __init__(self, processor: LlavaProcessor) -> None:
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        self.scale = float(ip.rescale_factor)

    def __call__(self, grid_uint8: torch.Tensor) -> torch.Tensor:
        x = grid_uint8.float()[:, None].expand(-1, 3, -1, -1) * self.scale
        return (x - self.mean) / self.std

    def check(self, processor: LlavaProcessor) -> None:
        from PIL import Image

        grid = grids.render_grid("train", (0, 450, 900, 1350))
        ref = processor.image_processor(images=[Image.fromarray(grid).convert("RGB")], return_tensors="pt")
        ours = self(torch.from_numpy(grid)[None])
        err = (ref["pixel_values"] - ours).abs().max().item()
        if err > 1e-5:
            raise RuntimeError(f"batched pixels differ from the processor's by {err}")


def augment(digits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), scale (+-10 %) and shift (+-2.5 px) of ``digits [n, 28, 28]`` in [0, 255]."""
    n = digits.shape[0]
    rand = torch.rand(n, 4, generator=gen) * 2 - 1
    angle, scale = rand[:, 0] * math.radians(12), 1 + rand[:, 1] * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, rand[:, 2] * 2.5 / 14], 1),
                         torch.stack([sin, cos, rand[:, 3] * 2.5 / 14], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, 28, 28), align_corners=False)
    out = F.grid_sample(digits[:, None].float(), grid, align_corners=False, padding_mode="zeros")[:, 0]
    return out.round().clamp(0, 255)


def compose(cells: torch.Tensor) -> torch.Tensor:
    """``[B, 4, 28, 28]`` cells in reading order -> ``[B, 56, 56]`` grids."""
    top = torch.cat([cells[:, 0], cells[:, 1]], -1)
    bottom = torch.cat([cells[:, 2], cells[:, 3]], -1)
    return torch.cat([top, bottom], -2)


def cell_features(hidden: torch.Tensor, patch: int) -> torch.Tensor:
    """Tower output ``[B, 1 + g*g, D]`` -> mean patch feature of each cell ``[B, 4, D]`` (reading order)."""
    g = grids.GRID_SIZE // patch
    q = g // 2
    p = hidden[:, 1:].reshape(hidden.shape[0], 2, q, 2, q, -1).permute(0, 1, 3, 2, 4, 5)
    return p.reshape(hidden.shape[0], 4, q * q, -1).mean(2)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_tower(model, pixels: Pixels, args, gen: torch.Generator, log: list) -> float:
    """Stage 1: the tower names the four digits of augmented training grids. Returns held-out cell accuracy."""
    tower = model.model.vision_tower
    images, labels = (torch.from_numpy(a) for a in grids.mnist_split()["train"])
    test_images, test_labels = (torch.from_numpy(a) for a in grids.mnist_split()["test"])
    head = torch.nn.Linear(args.tower_hidden, 10)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.tower_lr, weight_decay=0.05)
    tower.train()

    def accuracy() -> float:
        tower.eval()
        with torch.no_grad():
            cells = test_images.reshape(-1, 4, 28, 28)
            h = tower(pixel_values=pixels(compose(cells)), output_hidden_states=True).hidden_states[-1]
            acc = (head(cell_features(h, args.patch)).argmax(-1) == test_labels.reshape(-1, 4)).float().mean()
        tower.train()
        return float(acc)

    start = time.time()
    for step in range(args.tower_steps):
        idx = torch.randint(0, len(labels), (args.tower_batch * 4,), generator=gen)
        cells = augment(images[idx], gen).reshape(-1, 4, 28, 28)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.tower_steps, args.tower_lr, 50)
        h = tower(pixel_values=pixels(compose(cells)), output_hidden_states=True).hidden_states[-1]
        loss = F.cross_entropy(head(cell_features(h, args.patch)).reshape(-1, 10), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0 or step + 1 == args.tower_steps:
            acc = accuracy()
            log.append({"stage": 1, "step": step + 1, "loss": loss.item(), "digit_accuracy": acc,
                        "seconds": time.time() - start})
            print(f"[tower] step {step + 1}/{args.tower_steps} loss {loss.item():.3f} held-out digit accuracy "
                  f"{acc:.3f} ({time.time() - start:.0f} s)", flush=True)
    return accuracy()


class QuestionTokens:
    """Token ids of each question of the grammar through the chat template and processor: as the first turn (with
    the image) and as a follow-up turn; and answer ids (answer + ``</s>``, as the template renders them)."""

    def __init__(self, processor: LlavaProcessor) -> None:
        from PIL import Image

        blank = Image.new("RGB", (grids.GRID_SIZE, grids.GRID_SIZE))
        self.tokenizer = processor.tokenizer
        self.prompt: dict[str, list[int]] = {}
        self.followup: dict[str, list[int]] = {}
        first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many even digits are "
                                                                                           "there ?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]
        done = processor.apply_chat_template(first)
        for questions in grids.all_questions().values():
            for q in questions:
                turn = {"role": "user", "content": [{"type": "text", "text": q}]}
                text = processor.apply_chat_template([{**turn, "content": [{"type": "image"}, *turn["content"]]}],
                                                     add_generation_prompt=True)
                self.prompt[q] = processor(images=[blank], text=[text], return_tensors="pt")["input_ids"][0].tolist()
                more = processor.apply_chat_template([*first, turn], add_generation_prompt=True)
                assert more.startswith(done)
                self.followup[q] = self.tokenizer(more[len(done):], add_special_tokens=False)["input_ids"]
        self.eos = self.tokenizer.eos_token_id

    def answer(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]


def conversation_rows(items, rng, max_turns: int, types=grids.QUESTION_TYPES) -> list[list[tuple[str, str]]]:
    """Each item's grid gets 1..max_turns questions of ``types`` (the item's own first if its type is one)."""
    questions = grids.all_questions()
    rows = []
    for item in items:
        if item.type in types:
            turns = [(item.question, item.answer)]
        else:
            q = rng.choice(questions[rng.choice(types)])
            turns = [(q, grids.answer_for(q, item.digits))]
        for _ in range(rng.randrange(max_turns)):
            q = rng.choice(questions[rng.choice(types)])
            turns.append((q, grids.answer_for(q, item.digits)))
        rows.append(turns)
    return rows


def batch_tensors(rows, tokens: QuestionTokens, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens only) of multi-turn rows."""
    seqs = []
    for turns in rows:
        ids, labels = [], []
        for k, (question, answer) in enumerate(turns):
            prompt = tokens.prompt[question] if k == 0 else tokens.followup[question]
            reply = tokens.answer(answer)
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        seqs.append((ids, labels))
    length = max(len(i) for i, _ in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (i, lab) in enumerate(seqs):
        ids[b, :len(i)] = torch.tensor(i)
        mask[b, :len(i)] = 1
        labels[b, :len(i)] = torch.tensor(lab)
    return ids, mask, labels


def instruction_tune(model, processor, pixels: Pixels, args, gen: torch.Generator, log: list) -> None:
    """Stage 2: projector and decoder (and the tower if its learning rate is > 0) on grid questions, loss on the
    answer tokens; the first ``curriculum`` share of the steps asks position questions only."""
    tokens = QuestionTokens(processor)
    images = torch.from_numpy(grids.mnist_split()["train"][0])
    tower_params = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower_params}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    groups = [{"params": rest, "lr": args.lr, "peak": args.lr}]
    if args.tower_lr_stage2 > 0:
        groups.append({"params": tower_params, "lr": args.tower_lr_stage2, "peak": args.tower_lr_stage2})
    else:  # LLaVA's recipe: the pre-trained tower stays frozen
        for p in tower_params:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    curriculum = int(args.curriculum * args.steps)
    pad_id = processor.tokenizer.pad_token_id
    items = grids.sample_items(args.steps * args.batch, "train", seed=args.seed + 1)
    rng = random.Random(args.seed + 2)
    model.train()
    start = time.time()
    running = []
    for step in range(args.steps):
        chunk = items[step * args.batch:(step + 1) * args.batch]
        src = torch.tensor([it.sources for it in chunk]).reshape(-1)
        cells = augment(images[src], gen).reshape(-1, 4, 28, 28)
        types = ("digit",) if step < curriculum else grids.QUESTION_TYPES
        ids, mask, labels = batch_tensors(conversation_rows(chunk, rng, args.max_turns, types), tokens, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, group["peak"], 100)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(compose(cells)), labels=labels,
                    use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(out.loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = grid_accuracy(model, processor, grids.sample_items(300, "test", seed=12345), batch=100)
            model.train()
            entry = {"stage": 2, "step": step + 1, "loss": float(np.mean(running)),
                     "held_out_300": acc, "seconds": time.time() - start}
            log.append(entry)
            running = []
            per_type = " ".join(f"{k} {v:.2f}" for k, v in acc.items())
            print(f"[tune] step {step + 1}/{args.steps} loss {entry['loss']:.3f} held-out {per_type} "
                  f"({time.time() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="dpvr_kernels/data/demo", help="folder to write the model into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tower-layers", type=int, default=3)
    p.add_argument("--tower-hidden", type=int, default=128)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--tower-steps", type=int, default=1500)
    p.add_argument("--tower-batch", type=int, default=64, help="grids per tower step (4 digits each)")
    p.add_argument("--tower-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--tower-lr-stage2", type=float, default=0.0,
                   help="tower learning rate in stage 2 (default 0: frozen)")
    p.add_argument("--max-turns", type=int, default=1, help="questions per grid in a training sample: 1..N")
    p.add_argument("--curriculum", type=float, default=0.2,
                   help="fraction of stage-2 steps that ask only 'what is the digit at ...' questions first")
    p.add_argument("--tower-cache", default=None, help="(experiments) reuse/save the stage-1 tower from this file")
    p.add_argument("--eval-every", type=int, default=500)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    processor = build_processor(grids.GRID_SIZE, args.patch)
    model = build_model(processor.tokenizer, args)
    pixels = Pixels(processor)
    pixels.check(processor)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {n_params:,} parameters; {len(processor.tokenizer)} tokens", flush=True)
    log: list[dict] = []
    start = time.time()
    if args.tower_cache and Path(args.tower_cache).is_file():
        cached = torch.load(args.tower_cache)
        model.model.vision_tower.load_state_dict(cached["state"])
        tower_acc = cached["accuracy"]
    else:
        tower_acc = pretrain_tower(model, pixels, args, gen, log)
        if args.tower_cache:
            torch.save({"state": model.model.vision_tower.state_dict(), "accuracy": tower_acc}, args.tower_cache)
    instruction_tune(model, processor, pixels, args, gen, log)
    train_seconds = time.time() - start
    model.eval()
    held_out = grid_accuracy(model, processor, grids.sample_items(1000, "test", seed=2026), batch=100)
    print(f"held-out (1000 grids): {held_out}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"settings": vars(args), "parameters": n_params, "train_seconds": train_seconds,
              "threads": args.threads, "torch": torch.__version__, "tower_digit_accuracy": tower_acc,
              "held_out_1000": held_out, "log": log}
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({train_seconds / 60:.1f} min of training)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
