"""Tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, InternVL, Mistral3 and SmolVLM folders with their own processors
(image + video processors, chat template; small pixel budgets: a few dozen vision tokens per image), made offline.
These processors need torchvision: they run in the processors environment only."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 160
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "what is in the picture describe it a cat dog red blue house sun tree USER ASSISTANT : please".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


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


GLM_SPECIAL = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>",
               "<|end_of_video|>"]


def make_qwen_folder(folder: Path, name: str = "qwen2_5_vl", layers: int = 4, seed: int = 1) -> Path:
    """A tiny random M-RoPE model with its processor, saved in ``folder``: Qwen2-VL, Qwen2.5-VL (patch 14),
    Qwen3-VL (patch 16, deepstack after layers 0 and 1) or GLM-4V (partial rotary; its own image markers)."""
    import transformers as T

    glm = name == "glm4v"
    special = GLM_SPECIAL if glm else SPECIAL
    tok = _special_tokenizer(special)
    ids = [tok.convert_tokens_to_ids(t) for t in special]
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=2, eos_token_id=3,
                pad_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if glm:
        common = dict(image_start_token_id=ids[0], image_end_token_id=ids[1], image_token_id=ids[2],
                      video_token_id=ids[3], video_start_token_id=ids[4], video_end_token_id=ids[5])
        template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                         "<|begin_of_image|><|image|><|end_of_image|>")
    else:
        common = dict(vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
                      video_token_id=ids[3])
        template = CHAT_TEMPLATE
    video_cls = T.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor
    image_cls = T.Qwen2VLImageProcessor
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        prefix, processor_cls = "Qwen2VL", T.Qwen2VLProcessor
    elif name == "qwen2_5_vl":
        vision.update(fullatt_block_indexes=[1], window_size=56)
        prefix, processor_cls = "Qwen2_5_VL", T.Qwen2_5_VLProcessor
    elif name == "qwen3_vl":
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(patch_size=16, deepstack_visual_indexes=[0, 1], num_position_embeddings=64)
        prefix, processor_cls = "Qwen3VL", T.Qwen3VLProcessor
        video_cls = T.models.qwen3_vl.video_processing_qwen3_vl.Qwen3VLVideoProcessor
    elif glm:
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})
        vision.update(image_size=56)
        prefix, processor_cls, image_cls = "Glm4v", T.Glm4vProcessor, T.Glm4vImageProcessor
        video_cls = T.models.glm4v.video_processing_glm4v.Glm4vVideoProcessor
    else:
        raise ValueError(name)
    cfg = getattr(T, f"{prefix}Config")(text_config=text, vision_config=vision, **common)
    patch = vision["patch_size"]
    factor = patch * 2
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor}
    image_processor = image_cls(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    video_processor = video_cls(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                              chat_template=template)
    torch.manual_seed(seed)
    return _save(getattr(T, f"{prefix}ForConditionalGeneration")(cfg).eval(), processor, folder)


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


def make_smolvlm_folder(folder: Path, seed: int = 5) -> Path:
    """A tiny random SmolVLM (Llama decoder at ``model.model.text_model``; 56 px tiles of 4 tokens after a 2x pixel
    shuffle, images up to 112 px: up to 2 x 2 tiles + the global image) with its processor (row/column and global
    markers around ``<image>`` tokens: text under DPVR-LF)."""
    import transformers as T

    special = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", "<video>"]
    tok = _special_tokenizer(special)
    image_processor = T.SmolVLMImageProcessor(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    video_processor = T.models.smolvlm.video_processing_smolvlm.SmolVLMVideoProcessor(
        size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    processor = T.SmolVLMProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                   image_seq_len=4, chat_template=_chat_template("<image>"))
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14)
    text = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=2,
                         eos_token_id=3, pad_token_id=1)
    cfg = T.SmolVLMConfig(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    return _save(T.SmolVLMForConditionalGeneration(cfg).eval(), processor, folder)
