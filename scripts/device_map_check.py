"""DPVR-LF under an accelerate device_map with layers on two devices, against the same model on one device.

GPU run (scripts/gpu_check.sh, stage ``device_map``): a small LLaVA (random weights, fp32) is saved, loaded once on
``cuda:0`` and once with its decoder split between ``cuda:0`` and ``cpu`` (layers [0, r) and the vision tower on the
GPU, layers from the route layer on alternating between CPU and GPU, so the route, the text stream, the side branch
and the fusion cross devices), both patched; logits and greedy generate (dynamic and static cache) must agree.
``--dry-run`` (no GPU): the split is CPU and disk offload instead.

    python scripts/device_map_check.py [--dry-run]

Prints one JSON line; exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import dpvr_kernels

IMAGE_TOKEN, PER_IMAGE, LAYERS = 120, 4, 8
TOL = 1e-4  # fp32 on two devices: matmul rounding differs between CPU and GPU


def build(path: str) -> None:
    text = LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=LAYERS, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, image_seq_length=PER_IMAGE,
                      projector_hidden_act="gelu")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)


def inputs(device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    rows = [[5, 6] + [IMAGE_TOKEN] * PER_IMAGE + [7, 8, 9], [11, 12, 13, 14], [IMAGE_TOKEN] * PER_IMAGE]
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):  # left padding
        ids[b, length - len(row) :] = torch.tensor(row)
        mask[b, length - len(row) :] = 1
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pixels.to(device)}


def split_map(route: int, near: str, far: str) -> dict[str, str]:
    lm = "model.language_model"
    placement = {"model.vision_tower": near, "model.multi_modal_projector": near, f"{lm}.embed_tokens": near,
                 f"{lm}.rotary_emb": near, f"{lm}.norm": far, "lm_head": near}
    for i in range(LAYERS):
        placement[f"{lm}.layers.{i}"] = near if i < route else (far if (i - route) % 2 == 0 else near)
    return placement


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU + disk offload instead of cuda:0 + cpu")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("device_map_check: no CUDA GPU; pass --dry-run for the CPU/disk-offload variant", file=sys.stderr)
        return 3
    start = time.perf_counter()
    near, far = ("cpu", "disk") if args.dry_run else ("cuda:0", "cpu")
    result: dict = {"placement": f"{near}+{far}"}
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        single = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(tmp).to(near).eval())
        route = single.config.dpvr["route_layer"]
        split = LlavaForConditionalGeneration.from_pretrained(tmp, device_map=split_map(route, near, far),
                                                              offload_folder=f"{tmp}/offload").eval()
        dpvr_kernels.patch(split)
        result["devices"] = sorted({str(v) for v in split.hf_device_map.values()})
        result["side_branch_device"] = str(next(split.model.language_model.dpvr_side_branch.parameters()).device)
        batch = inputs(near)
        with torch.no_grad():
            want, got = single(**batch).logits, split(**batch).logits
        result["logits_max_abs"] = float((got.to(want.device) - want).abs().max())
        gen = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        for impl in ("dynamic", "static"):
            a = single.generate(**batch, **gen, cache_implementation=impl)
            b = split.generate(**batch, **gen, cache_implementation=impl)
            result[f"generate_{impl}_equal"] = bool(torch.equal(a.cpu(), b.cpu()))
    result["ok"] = result["logits_max_abs"] <= TOL and result["generate_dynamic_equal"] and result["generate_static_equal"]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
