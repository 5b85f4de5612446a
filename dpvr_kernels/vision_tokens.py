"""How many vision tokens the decoder sees per image or video, and how much vision-tower work makes them.

Plain integer arithmetic on a config, no model is built. The counts follow what the transformers models
and processors of each LLaVA class produce (the processor inserts exactly this many image/video token ids):

* **LLaVA-1.5 / BakLLaVA / VipLLaVA**: one tower pass per image; ``(image_size // patch_size) ** 2`` patch
  tokens, plus the CLS token for the ``"full"`` strategy of a CLIP tower (SigLIP has no CLS token).
* **LLaVA-NeXT ("anyres")**: the image is resized to the best of ``config.image_grid_pinpoints`` and cut into
  tiles of the tower's input size; the tower runs on every tile plus one base tile (the whole image
  resized). The decoder sees the base tile's tokens, then the tiles' patch grid with the padding rows or
  columns removed (the image's aspect ratio restored) and one ``image_newline`` token at the end of every
  row of that grid. A 672 x 672 image: 576 + 48 x 48 + 48 = 2928 tokens from 5 tower passes.
* **LLaVA-OneVision**: the same with a SigLIP tower (384 px, 729 tokens per tile), and the unpadded grid is
  shrunk (bilinear) when it holds more than ``anyres_max_N`` tiles' worth of patches (by more than 10 %).
  In a sample with several images every image is one base tile plus one newline token. A video of ``F``
  frames: ``F * ceil(P / 2) ** 2 + 1`` tokens (each frame's ``P x P`` grid pooled 2x, one newline).
* **LLaVA-NeXT-Video**: a video of ``F`` frames gives ``F * (P // s) ** 2`` tokens (``s`` =
  ``spatial_pool_stride``, 2), no newline; images as LLaVA-NeXT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import as_int

__all__ = ["VisionWork", "anyres_grid", "image_work", "is_anyres", "tokens_per_image", "video_work"]


@dataclass(frozen=True)
class VisionWork:
    """The vision part of one prompt: decoder tokens and the work that produces them.

    Attributes:
        tokens: vision tokens in the decoder's input (image and video token ids).
        tower_passes: vision-tower forward passes (tiles, base tiles, video frames), each on one full-size
            tower input.
        projector_tokens: tokens that go through the multimodal projector.
        images: images among them (for reports).
        videos: videos among them.
    """

    tokens: int
    tower_passes: int
    projector_tokens: int
    images: int = 0
    videos: int = 0

    def __add__(self, other: VisionWork) -> VisionWork:
        return VisionWork(self.tokens + other.tokens, self.tower_passes + other.tower_passes,
                          self.projector_tokens + other.projector_tokens, self.images + other.images,
                          self.videos + other.videos)

    def __mul__(self, times: int) -> VisionWork:
        n = as_int(times, "times")
        return VisionWork(self.tokens * n, self.tower_passes * n, self.projector_tokens * n, self.images * n,
                          self.videos * n)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"vision_config.{name} must be an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _patch_grid(config: Any) -> tuple[int, int]:
    """Patch rows and columns of one tower input (one tile)."""
    vcfg = config.vision_config
    (ih, iw), (ph, pw) = _pair(vcfg.image_size, "image_size"), _pair(vcfg.patch_size, "patch_size")
    return ih // ph, iw // pw


def _has_cls(config: Any) -> bool:
    return getattr(config.vision_config, "model_type", "") != "siglip_vision_model"


def tokens_per_image(config: Any) -> int:
    """Tokens one tower pass (one image for LLaVA-1.5; one tile for anyres models) gives the decoder.

    ``(image_size // patch_size) ** 2`` patch tokens; the ``"full"`` strategy keeps the CLS token of a CLIP
    tower, ``"default"`` drops the first token (CLIP's CLS). 0 for a config without a vision tower.
    """
    if getattr(config, "vision_config", None) is None:
        return 0
    rows, cols = _patch_grid(config)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    return rows * cols + int(_has_cls(config)) - int(strategy == "default")


def is_anyres(config: Any) -> bool:
    """Whether the config cuts images into tiles (LLaVA-NeXT, -NeXT-Video, -OneVision)."""
    return getattr(config, "image_grid_pinpoints", None) is not None


def anyres_grid(config: Any, height: int, width: int) -> tuple[int, int]:
    """Tile rows and columns that an anyres model cuts a ``height x width`` image into.

    The image goes to the pinpoint resolution that keeps most of its pixels (ties: least padding), as
    transformers' ``select_best_resolution`` picks it.
    """
    from transformers.image_processing_utils import select_best_resolution

    height, width = as_int(height, "height"), as_int(width, "width")
    if height < 1 or width < 1:
        raise ValueError(f"an image needs a positive size, got {height} x {width} px")
    tile_h, tile_w = _pair(config.vision_config.image_size, "image_size")
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    return best_h // tile_h, best_w // tile_w


def _unpadded(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The patch grid ``grid_h x grid_w`` with the letterbox padding of a ``height x width`` image removed.

    The image was scaled to fit the grid and centred; the side that did not fill loses an equal number of
    padding rows (or columns) at both ends.
    """
    if width * grid_h > grid_w * height:  # wider than the grid: rows of padding above and below
        fitted = int(round(height * (grid_w / width), 7))
        return grid_h - 2 * ((grid_h - fitted) // 2), grid_w
    fitted = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - 2 * ((grid_w - fitted) // 2)


def _max_tiles(config: Any) -> int | None:
    if getattr(config, "model_type", "") != "llava_onevision":
        return None
    ratio = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    if not ratio.startswith("anyres_max_"):
        raise ValueError(f"vision_aspect_ratio {ratio!r} is not modelled; expected 'anyres_max_N'")
    return int(ratio.removeprefix("anyres_max_"))


def image_work(config: Any, height: int | None = None, width: int | None = None,
               multi_image: bool = False) -> VisionWork:
    """Tokens and tower work of one image of ``height x width`` pixels.

    Args:
        config: a LLaVA-family config.
        height, width: the image's size in pixels; needed for anyres models (LLaVA-NeXT, -OneVision),
            ignored otherwise.
        multi_image: LLaVA-OneVision only: the image is one of several in its sample (base tile + newline).

    Raises:
        ValueError: for an anyres model without the image size.
    """
    per_tile = tokens_per_image(config)
    if not is_anyres(config):
        return VisionWork(per_tile, 1, per_tile, images=1)
    onevision = getattr(config, "model_type", "") == "llava_onevision"
    if onevision and multi_image:
        return VisionWork(per_tile + 1, 1, per_tile, images=1)
    if height is None or width is None:
        raise ValueError(
            f"{getattr(config, 'model_type', 'this')} models cut each image into tiles by its size: pass the "
            f"image's height and width in pixels (e.g. image_work(config, 672, 672))"
        )
    tiles_h, tiles_w = anyres_grid(config, height, width)
    rows, cols = _patch_grid(config)
    grid_h, grid_w = _unpadded(height, width, tiles_h * rows, tiles_w * cols)
    limit = _max_tiles(config)
    if limit is not None:
        ratio = math.sqrt(grid_h * grid_w / (limit * rows * rows))
        if ratio > 1.1:
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
    passes = 1 + tiles_h * tiles_w
    return VisionWork(per_tile + grid_h * grid_w + grid_h, passes, passes * per_tile, images=1)


def video_work(config: Any, frames: int) -> VisionWork:
    """Tokens and tower work of one video of ``frames`` frames (LLaVA-NeXT-Video, LLaVA-OneVision).

    Raises:
        ValueError: for a model without videos or a frame count below 1.
    """
    frames = as_int(frames, "frames")
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got frames={frames}")
    rows, cols = _patch_grid(config)
    model_type = getattr(config, "model_type", "")
    if model_type == "llava_next_video":
        stride = int(getattr(config, "spatial_pool_stride", 2))
        per_frame = (rows // stride) * (cols // stride)
        return VisionWork(frames * per_frame, frames, frames * per_frame, videos=1)
    if model_type == "llava_onevision":
        per_frame = math.ceil(rows / 2) * math.ceil(cols / 2)
        return VisionWork(frames * per_frame + 1, frames, frames * rows * cols, videos=1)
    raise ValueError(
        f"model_type {model_type!r} takes no videos; video token counts are modelled for llava_next_video "
        f"and llava_onevision"
    )
