"""Tiny random-weight M-RoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4V) and batches laid out per
sample as their processors make them (placeholders per grid, ``mm_token_type_ids``, flat patch rows)."""

from __future__ import annotations

import torch
from tiny import pad_rows
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

IMAGE, VIDEO = 120, 121
CLASSES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v")
QWEN3 = ("qwen3_vl", "qwen3_vl_moe")
FRAMES_SPLIT = ("qwen3_vl", "qwen3_vl_moe", "glm4v")  # a video's frames are separated by timestamp text
DEEPSTACK = 2  # Qwen3-VL injections after decoder layers 0 and 1
PATCH_ROW = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
# Grids (t, h, w) in patches, cycled over a batch's images: 6, 4 and 9 tokens after the 2 x 2 merge.
IMAGE_GRIDS = [(1, 4, 6), (1, 4, 4), (1, 6, 6)]
VIDEO_GRID = (2, 4, 4)  # 8 tokens


def tiny_qwen(name: str, seed: int = 0, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                 video_token_id=VIDEO), Qwen2VLForConditionalGeneration
    elif name == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                      window_size=56)
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                    video_token_id=VIDEO), Qwen2_5_VLForConditionalGeneration
    elif name == "glm4v":
        # GLM-4V: partial rotary (half of the 16-dim heads), M-RoPE sections over the 4 rotary frequencies.
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, image_size=56)
        cfg, cls = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                               video_token_id=VIDEO), Glm4vForConditionalGeneration
    else:
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        if name == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      deepstack_visual_indexes=list(range(DEEPSTACK)), num_position_embeddings=64)
        config_cls, cls = ((Qwen3VLConfig, Qwen3VLForConditionalGeneration) if name == "qwen3_vl"
                           else (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration))
        cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO)
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).eval()
    model.generation_config.suppress_tokens = [IMAGE, VIDEO]  # a random model may emit a placeholder
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def qwen_batch(model, layouts: list[list[str]], seed: int = 0, left_pad: bool = True) -> dict:
    """Inputs as the Qwen processors make them: placeholders per grid, ``mm_token_type_ids``, flat patch rows."""
    g = torch.Generator().manual_seed(seed)
    rows, types, image_grids, video_grids = [], [], [], []
    for layout in layouts:
        ids: list[int] = []
        kinds: list[int] = []  # mm_token_type_ids: 0 text, 1 image, 2 video
        for item in layout:
            if item == "I":
                grid = IMAGE_GRIDS[len(image_grids) % len(IMAGE_GRIDS)]
                image_grids.append(grid)
                ids += [IMAGE] * (grid[0] * grid[1] * grid[2] // 4)
                kinds += [1] * (grid[0] * grid[1] * grid[2] // 4)
            elif item == "V":
                video_grids.append(VIDEO_GRID)
                placeholder = IMAGE if model.config.model_type == "glm4v" else VIDEO  # GLM: image ids
                frame = [placeholder] * (VIDEO_GRID[1] * VIDEO_GRID[2] // 4)
                if model.config.model_type in FRAMES_SPLIT:
                    ids += frame + [7] + frame  # a timestamp (text) between the frames
                    kinds += [2] * len(frame) + [0] + [2] * len(frame)
                else:
                    ids += frame * VIDEO_GRID[0]
                    kinds += [2] * len(frame) * VIDEO_GRID[0]
            else:
                ids.append(int(torch.randint(1, IMAGE - 1, (1,), generator=g)))
                kinds.append(0)
        rows.append(ids)
        types.append(kinds)
    input_ids, mask = pad_rows(rows, left_pad)
    mm_types, _ = pad_rows(types, left_pad)
    batch = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm_types}
    if image_grids:
        grid = torch.tensor(image_grids)
        batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), PATCH_ROW, generator=g)
        batch["image_grid_thw"] = grid
    if video_grids:
        grid = torch.tensor(video_grids)
        batch["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), PATCH_ROW, generator=g)
        batch["video_grid_thw"] = grid
        if isinstance(model, Qwen2_5_VLForConditionalGeneration):
            batch["second_per_grid_ts"] = torch.tensor([1.0] * len(video_grids))
    return batch


LAYOUTS = [["T", "T", "I", "T", "I", "T"], ["T", "V", "T", "T"], ["T", "T", "T", "T"], ["T", "I", "T", "V", "T"]]
# GLM-4V marks video frames with the image id, and its stock forward cannot tell images from videos in one call:
# its batches hold images or videos.
GLM_LAYOUTS = [["T", "T", "I", "T", "I", "T"], ["T", "I", "T", "T"], ["T", "T", "T", "T"]]
GLM_VIDEO_LAYOUTS = [["T", "V", "T", "T"], ["T", "T", "T"], ["T", "T", "V", "T"]]


def layouts(name: str, video: bool = False) -> list[list[str]]:
    if name.startswith("glm4v"):
        return GLM_VIDEO_LAYOUTS if video else GLM_LAYOUTS
    return LAYOUTS
