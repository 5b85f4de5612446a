"""Tiny random Qwen2.5-VL and Qwen3-VL folders with their own processors (image + video processors, chat template),
made offline. The Qwen processors need torchvision: these run in the processors environment only."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

VOCAB = 160
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "what is in the picture describe it a cat dog red blue house sun tree USER ASSISTANT : please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
# Small pixel budgets: a few dozen vision tokens per image.
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28


def _special_tokenizer(special: list[str], extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The word tokenizer with ``special`` tokens (``extra``: named ones, e.g. InternVL's ``context_image_token``,
    which the processor reads as tokenizer attributes)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *special, *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left", extra_special_tokens=extra or {})
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer


def _chat_template(image: str) -> str:
    return CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", image)


def _save(model, processor, folder: Path) -> Path:
    with torch.no_grad():  # larger random weights so greedy answers are not one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _text(**kw):
    from transformers import MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=2,
                  eos_token_id=3, pad_token_id=1)
    backbone = kw.pop("backbone")
    common.update(kw)
    return (Qwen2Config(use_sliding_window=False, **common) if backbone == "qwen2"
            else MistralConfig(sliding_window=None, **common))


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with Qwen's vision special tokens."""
    return _special_tokenizer(SPECIAL)


def make_qwen_folder(folder: Path, name: str = "qwen2_5_vl", layers: int = 4, seed: int = 1) -> Path:
    """A tiny random Qwen2.5-VL (patch 14) or Qwen3-VL (patch 16, deepstack after layers 0 and 1) with its
    processor, saved in ``folder``."""
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=2, eos_token_id=3,
                pad_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if name == "qwen2_5_vl":
        patch = 14
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                      window_size=56)
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common), Qwen2_5_VLForConditionalGeneration
        processor_cls, video_cls = Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    else:
        patch = 16
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, deepstack_visual_indexes=[0, 1],
                      num_position_embeddings=64)
        cfg, cls = Qwen3VLConfig(text_config=text, vision_config=vision, **common), Qwen3VLForConditionalGeneration
        processor_cls, video_cls = Qwen3VLProcessor, Qwen3VLVideoProcessor
    factor = patch * 2
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    video_processor = video_cls(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                              chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    return _save(cls(cfg).eval(), processor, folder)


def make_internvl_folder(folder: Path, seed: int = 3) -> Path:
    """A tiny random InternVL (Qwen2 decoder, 56 px tiles of 4 tokens, up to 4 tiles + thumbnail) with its
    processor (GotOcr2 tiles, ``<img>``/``</img>`` around ``<IMG_CONTEXT>`` tokens)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    special = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = _special_tokenizer(special, {"start_image_token": "<img>", "end_image_token": "</img>",
                                       "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                            max_patches=4)
    video_processor = InternVLVideoProcessor(size={"height": 56, "width": 56})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                  image_seq_length=4, chat_template=_chat_template("<IMG_CONTEXT>"))
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  image_size=[56, 56], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vision, text_config=_text(backbone="qwen2").to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                         image_seq_length=4)
    torch.manual_seed(seed)
    return _save(InternVLForConditionalGeneration(cfg).eval(), processor, folder)


def make_mistral3_folder(folder: Path, seed: int = 4) -> Path:
    """A tiny random Mistral3 (Pixtral tower, patch 14, 2 x 2 merge, images up to 112 px) with its processor
    (``[IMG]`` rows closed by ``[IMG_BREAK]``, ``[IMG_END]`` last: those two are text tokens under DPVR-LF)."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    special = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _special_tokenizer(special)
    image_processor = PixtralImageProcessor(size={"longest_edge": 112}, patch_size={"height": 14, "width": 14})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14, spatial_merge_size=2,
                                 chat_template=_chat_template("[IMG]"))
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=112,
                  patch_size=14, head_dim=16)
    cfg = Mistral3Config(vision_config=vision, text_config=_text(backbone="mistral").to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    torch.manual_seed(seed)
    return _save(Mistral3ForConditionalGeneration(cfg).eval(), processor, folder)
