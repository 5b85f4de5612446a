"""Tiny random LLaVA checkpoints for the vLLM plugin tests: a stock folder and its DPVR-LF twin (patched, side
branch trained away from its initial copy, saved, marked with ``prepare_checkpoint``), and prompts of different
lengths with 0, 1 and 2 images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from model_folder import make_llava_folder, make_llava_next_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import dpvr_kernels
from dpvr_kernels.vllm import llava_hf_key, prepare_checkpoint

IMAGE_SIZE, PATCH = 56, 14  # 16 vision tokens per image
ROUTE_LAYER = 3
NUM_LAYERS = 6


BENCH_SIZE = dict(hidden=384, heads=6, kv_heads=6, layers=12, image_size=336, intermediate=1024)
"""The vLLM benchmarks' model: LLaVA-1.5-shaped, scaled to a CPU (route layer 7 by default, head size 64,
24 x 24 = 576 vision tokens per image)."""
BENCH_WORDS = "what is in the picture describe it please the red house and a blue sun over a tree cat dog".split()


def bench_question(i: int) -> str:
    """The ``i``-th benchmark question: 5 to 19 words, cycling."""
    return " ".join(BENCH_WORDS[: 4 + 2 * (i % 8)])


def bench_requests(n: int, seed: int = 5) -> list[dict]:
    """``n`` requests with one image each (new images for each ``seed``) and prompts of different lengths."""
    imgs = images(n, seed=seed)
    return [{"prompt": f"USER : <image> {bench_question(i)} ASSISTANT :", "multi_modal_data": {"image": im}}
            for i, im in enumerate(imgs)]


def make_stock_folder(folder: Path, seed: int = 3, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                      layers: int = NUM_LAYERS, image_size: int = IMAGE_SIZE, intermediate: int | None = None) -> Path:
    """A LLaVA-1.5-style model vLLM's CPU attention can run (head size ``hidden / heads`` in 32, 64, ...;
    by default 32 with GQA 4:2), with its processor; ``(image_size / 14)**2`` vision tokens per image."""
    make_llava_folder(folder, image_size=image_size, patch=PATCH, layers=layers, seed=seed, hidden=hidden,
                      heads=heads, kv_heads=kv_heads, intermediate=intermediate, max_positions=2048)
    return _llava_hf_layout(folder)


def make_next_stock_folder(folder: Path, seed: int = 5) -> Path:
    """A LLaVA-NeXT model vLLM's CPU attention can run (head size 32, GQA 4:2; 28 px anyres tiles, grids up to
    2 x 2: 4 tokens per tile plus image-newline rows), with its processor."""
    make_llava_next_folder(folder, layers=NUM_LAYERS, seed=seed, hidden=128, heads=4, kv_heads=2, max_positions=2048)
    return _llava_hf_layout(folder)


def make_onevision_stock_folder(folder: Path, seed: int = 6) -> Path:
    """A LLaVA-OneVision model (SigLIP, Qwen2 decoder with head size 32; 28 px anyres tiles, grids up to 2 x 2) with
    its processor (image and video processors: torchvision, which the vLLM environment has)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "processors"))
    from processor_folders import make_llava_video_folder

    make_llava_video_folder(folder, "llava_onevision", seed=seed, hidden_size=128, num_hidden_layers=NUM_LAYERS,
                            max_position_embeddings=2048)
    return _llava_hf_layout(folder)


def make_qwen_stock_folder(folder: Path, seed: int = 7) -> Path:
    """A Qwen2.5-VL model (windowed ViT, Qwen2 decoder with head size 32, M-RoPE sections 4/6/6) with its processor
    (small pixel budgets: a few dozen vision tokens per image)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "processors"))
    from processor_folders import make_qwen_folder

    return make_qwen_folder(folder, "qwen2_5_vl", layers=NUM_LAYERS, seed=seed, hidden_size=128,
                            max_position_embeddings=2048,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})


def qwen_prompts() -> list[tuple[str, list[Image.Image]]]:
    """:func:`prompts` with Qwen's image placeholder."""
    return [(text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>"), imgs) for text, imgs in prompts()]


def _llava_hf_layout(folder: Path) -> Path:
    # transformers 5 saves the CLIP tower flattened ([model.]vision_tower.embeddings...); stock vLLM 0.32 loads the
    # llava-hf layout (model.vision_tower.vision_model.embeddings...), which transformers also reads: use that.
    path = folder / "model.safetensors"
    save_file({llava_hf_key(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return folder


def make_dpvr_folder(stock: Path, folder: Path, seed: int = 4, route_layer: int | None = ROUTE_LAYER) -> Path:
    """The stock model patched at ``route_layer`` (None: the default), its side branch moved off layer r's copy
    (as training would), saved and prepared for the vLLM plugin."""
    model = AutoModelForImageTextToText.from_pretrained(stock, dtype=torch.float32).eval()
    dpvr_kernels.patch(model, route_layer=route_layer)
    side = model.model.language_model.dpvr_side_branch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in side.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "special_tokens_map.json"):
        if (stock / name).exists():
            shutil.copy(stock / name, folder / name)
    prepare_checkpoint(folder)
    return folder


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def prompts() -> list[tuple[str, list[Image.Image]]]:
    """Requests of different lengths: one image early or late, two images, and no image at all."""
    one, two, three, four = images(4)
    return [
        ("USER : <image> what is in the picture ASSISTANT :", [one]),
        ("USER : describe the red house and the blue sun please <image> ASSISTANT :", [two]),
        ("USER : what is in the picture", []),
        ("USER : <image> a cat <image> a dog what is it ASSISTANT :", [three, four]),
        ("USER : <image> tree ASSISTANT :", [four]),
    ]


def kv_capacity(folder: Path, requests: list[dict], kv_cache_memory_bytes: int, new_tokens: int = 4,
                block_size: int = 32, max_model_len: int = 1024, defaults: bool = False) -> dict:
    """Serve ``requests`` all at once from a KV cache of ``kv_cache_memory_bytes`` and count what fits: the KV
    groups (spec, layers), the blocks in the pool, each group's blocks per request after the prefill step, and the
    most requests running at once. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), without
    chunked prefill and prefix caching unless ``defaults`` (vLLM's: both on; then the DPVR-LF side branch keeps KV,
    in a vision-only group of its own)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", max_model_len=max_model_len, max_num_seqs=len(requests),
              max_num_batched_tokens=max_model_len * len(requests), kv_cache_memory_bytes=kv_cache_memory_bytes,
              block_size=block_size, limit_mm_per_prompt={"image": 2}, seed=0, enforce_eager=True,
              enable_chunked_prefill=defaults, enable_prefix_caching=defaults)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    config = scheduler.kv_cache_config
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    for i, request in enumerate(requests):
        engine.add_request(str(i), request, params)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    peak, first_blocks = 0, None
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, len(scheduler.running))
        if first_blocks is None:
            first_blocks = [sorted({len(b) for b in m.req_to_blocks.values() if b}) for m in managers]
    del llm
    return {
        "num_blocks": config.num_blocks,
        "groups": [(type(g.kv_cache_spec).__name__, len(g.layer_names)) for g in config.kv_cache_groups],
        "blocks_per_request": first_blocks,
        "peak_running": peak,
    }
