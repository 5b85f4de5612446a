"""A user's model folder made offline (nothing is downloaded): tiny random LLaVA-family models with a word-level tokenizer,
an image processor and a chat template, saved with ``save_pretrained``; and the processors alone."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

VOCAB = 200
WORDS = "what is in the picture describe it a cat dog red blue house sun tree USER ASSISTANT : please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer of ``VOCAB`` ids with ``<image>`` and ``<video>`` as special tokens."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", "<video>", *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def backbone_config(layers: int, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                    max_positions: int = 256) -> LlamaConfig:
    """The folders' Llama backbone over the word tokenizer's vocabulary."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, bos_token_id=2, eos_token_id=3, pad_token_id=1)


def make_llava_folder(folder: Path, image_size: int = 28, patch: int = 14, layers: int = 4, seed: int = 1,
                      hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                      max_positions: int = 256) -> Path:
    """A tiny random ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` saved in ``folder``."""
    tokenizer = word_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    text = backbone_config(layers, hidden, heads, kv_heads, intermediate, max_positions)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    return save_folder(LlavaForConditionalGeneration(cfg).eval(), processor, folder)


def save_folder(model, processor, folder: Path, scale: float = 4.0) -> Path:
    """``model`` and ``processor`` saved in ``folder``, the model's matrices scaled by ``scale`` first: larger random
    weights, so that greedy answers are not one repeated token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_llava_next_folder(folder: Path, layers: int = 4, seed: int = 2, hidden: int = 64, heads: int = 4,
                           kv_heads: int = 2, max_positions: int = 256) -> Path:
    """A tiny random ``LlavaNextForConditionalGeneration`` (anyres 28 px tiles, grids up to 2 x 2) with its
    ``LlavaNextProcessor`` (the PIL image processor: no torchvision needed) saved in ``folder``."""
    tokenizer = word_tokenizer()
    grids = [[28, 56], [56, 28], [56, 56]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=grids)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                   patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    text = backbone_config(layers, hidden, heads, kv_heads, max_positions=max_positions)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = LlavaNextConfig(text_config=text, vision_config=vision,
                          image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=grids,
                          vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_png(path: Path, height: int = 40, width: int = 52, seed: int = 0) -> Path:
    """A small random-colour PNG."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path
