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

Dynamic-resolution models (:data:`DYNAMIC_TYPES`; their :class:`VisionWork` also carries ``tower_tokens``
and ``tower_pairs``, the encoder's tokens and allowed attention pairs summed over all its layers, since
their tower inputs vary in size):

* **Qwen2-VL / Qwen2.5-VL / Qwen3-VL, GLM-4V**: the image is resized by ``smart_resize`` (:func:`fit_pixels`:
  sides multiples of ``patch * merge``, area within ``[min_pixels, max_pixels]``; defaults: the public
  checkpoints' 3136 / 12845056 for Qwen2(.5)-VL, 65536 / 16777216 for Qwen3-VL, the processor's default for
  GLM-4V), giving a ``grid_thw`` of patches; the decoder sees ``t * h * w / merge ** 2`` tokens. Videos: frames
  padded to a multiple of the temporal patch (2), ``t = ceil(frames / 2)``. The encoder attends within each
  temporal slice; Qwen2.5-VL's non-``fullatt_block_indexes`` layers within windows (:func:`grid_work`).
* **InternVL**: the image is cut into the tile grid of ``1 .. max_tiles`` (12) tiles whose aspect ratio is
  closest (:func:`tile_canvas`), plus a thumbnail tile when there is more than one; each 448 px tile gives
  ``(448 / 14 * downsample_ratio) ** 2 = 256`` tokens (pixel shuffle). ``<img>`` / ``</img>`` are 2 text tokens
  (``marker_tokens``).
* **Idefics3 / SmolVLM**: the longest side is resized to ``longest_edge`` (4 tiles), both sides rounded up to
  tiles; more than one tile adds the global image; each tile gives ``(image_size // patch) ** 2 /
  scale_factor ** 2`` tokens. The ``<row_r_col_c>`` / ``<global-img>`` markers are text tokens (not counted).
* **Mistral3 (Pixtral)**: the image is shrunk to ``longest_edge`` and rounded up to ``patch * merge``; the
  decoder sees ``rows * cols`` merged tokens. Each row ends in ``[IMG_BREAK]`` (the last in ``[IMG_END]``):
  ``rows`` **text** tokens, in ``marker_tokens`` for the caller to add to the text tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import as_int

__all__ = [
    "DYNAMIC_TYPES",
    "LLAVA_TYPES",
    "GRID_TYPES",
    "VisionWork",
    "anyres_grid",
    "check_modelled",
    "fit_pixels",
    "grid_work",
    "image_grid",
    "image_work",
    "is_anyres",
    "tile_canvas",
    "tokens_per_image",
    "video_grid",
    "video_work",
]


@dataclass(frozen=True)
class VisionWork:
    """The vision part of one prompt: decoder tokens and the work that produces them.

    Attributes:
        tokens: vision tokens in the decoder's input (image and video token ids).
        tower_passes: vision-tower forward passes (tiles, base tiles, video frames; for the dynamic-resolution
            towers one image or one video).
        projector_tokens: tokens that go through the multimodal projector (for Qwen/GLM towers: the patch
            merger's output tokens).
        images: images among them (for reports).
        videos: videos among them.
        tower_tokens: dynamic-resolution towers only (0 otherwise: every pass is one full-size tower input):
            encoder tokens summed over the passes (patches, plus CLS tokens where the tower has one).
        tower_pairs: dynamic-resolution towers only: query-key pairs the encoder's attention allows, summed
            over the passes **and all encoder layers** (windowed layers count their windows only).
        marker_tokens: text tokens the processor adds around or between the vision tokens and that are not
            vision tokens (Pixtral's ``[IMG_BREAK]`` / ``[IMG_END]``): add them to the text tokens. 0 where not
            counted.
    """

    tokens: int
    tower_passes: int
    projector_tokens: int
    images: int = 0
    videos: int = 0
    tower_tokens: int = 0
    tower_pairs: int = 0
    marker_tokens: int = 0

    def __add__(self, other: VisionWork) -> VisionWork:
        return VisionWork(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def __mul__(self, times: int) -> VisionWork:
        n = as_int(times, "times")
        return VisionWork(*(a * n for a in dataclasses.astuple(self)))


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


#: The LLaVA-family model types whose towers and token counts are modelled by the LLaVA rules above.
LLAVA_TYPES: tuple[str, ...] = ("llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava")


def check_modelled(config: Any) -> None:
    """ValueError unless the config's vision tokens are modelled here (the LLaVA family, :data:`DYNAMIC_TYPES`):
    a tower of another class (DeepSeek-VL, Janus, Ovis2, FastVLM, PerceptionLM, ...) may look like a CLIP or
    SigLIP tower and still give another count, so it is refused rather than priced wrongly."""
    model_type = _model_type(config)
    if model_type and model_type not in LLAVA_TYPES and model_type not in DYNAMIC_TYPES:
        raise ValueError(
            f"the vision tokens of model_type {model_type!r} are not modelled by dpvr_kernels' cost model (it models "
            f"{', '.join(LLAVA_TYPES + DYNAMIC_TYPES)}); price the decoder alone: cost_model(config.text_config, "
            f"vision_tokens, text_tokens), with the vision-token count the processor inserts"
        )


def tokens_per_image(config: Any) -> int:
    """Tokens one tower pass (one image for LLaVA-1.5; one tile for anyres models) gives the decoder.

    ``(image_size // patch_size) ** 2`` patch tokens; the ``"full"`` strategy keeps the CLS token of a CLIP
    tower, ``"default"`` drops the first token (CLIP's CLS). 0 for a config without a vision tower.
    """
    if getattr(config, "vision_config", None) is None:
        return 0
    check_modelled(config)
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
               multi_image: bool = False, *, min_pixels: int | None = None, max_pixels: int | None = None,
               max_tiles: int | None = None, longest_edge: int | None = None) -> VisionWork:
    """Tokens and tower work of one image of ``height x width`` pixels.

    Args:
        config: a LLaVA-family config, or one of :data:`DYNAMIC_TYPES` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V,
            InternVL, Idefics3, SmolVLM, Mistral3).
        height, width: the image's size in pixels; needed for anyres and dynamic-resolution models, ignored
            for LLaVA-1.5-style ones.
        multi_image: LLaVA-OneVision only: the image is one of several in its sample (base tile + newline).
        min_pixels, max_pixels: Qwen / GLM-4V: the image processor's pixel bounds (default: the public
            checkpoints' preprocessor configs, see the module docstring).
        max_tiles: InternVL: the image processor's ``max_patches`` (default 12).
        longest_edge: Idefics3 / SmolVLM: the image processor's ``size["longest_edge"]`` (default 4 tiles);
            Mistral3: the longest side an image is shrunk to (default ``vision_config.image_size``).

    Raises:
        ValueError: for an anyres or dynamic-resolution model without the image size.
    """
    check_modelled(config)
    if _model_type(config) in DYNAMIC_TYPES:
        return _dynamic_image_work(config, height, width, min_pixels, max_pixels, max_tiles, longest_edge)
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


def video_work(config: Any, frames: int, height: int | None = None, width: int | None = None, *,
               min_pixels: int | None = None, max_pixels: int | None = None) -> VisionWork:
    """Tokens and tower work of one video of ``frames`` frames (LLaVA-NeXT-Video, LLaVA-OneVision; Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL).

    Args:
        config: the model's config.
        frames: frames given to the model (after the processor's sampling).
        height, width: Qwen models: the frames' size in pixels (resized by the video processor's rule,
            :func:`video_grid`); ignored by the LLaVA family.
        min_pixels, max_pixels: Qwen models: the video processor's pixel bounds (default: its defaults).

    Raises:
        ValueError: for a model without videos or a frame count below 1.
    """
    frames = as_int(frames, "frames")
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got frames={frames}")
    check_modelled(config)
    if _model_type(config) in DYNAMIC_TYPES:
        return grid_work(config, *video_grid(config, frames, height, width, min_pixels, max_pixels), video=True)
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


# --------------------------------------------------------------------------------------------------------
# Dynamic-resolution models: Qwen2-VL / 2.5-VL / 3-VL, GLM-4V, InternVL, Idefics3 / SmolVLM, Mistral3
# --------------------------------------------------------------------------------------------------------

#: Models whose vision towers take each image at (nearly) its own resolution, as patch grids of varying size.
GRID_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")
#: Every model type with a processor-dependent token count modelled here (besides the LLaVA family).
DYNAMIC_TYPES: tuple[str, ...] = (*GRID_TYPES, "internvl", "smolvlm", "idefics3", "mistral3")

# Image (min_pixels, max_pixels) of the public checkpoints' preprocessor_config.json: Qwen2-VL / Qwen2.5-VL
# 3136 / 12845056, Qwen3-VL 65536 / 16777216; GLM-4V: the transformers image processor's default.
_IMAGE_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056), "qwen3_vl": (65536, 16777216),
                 "glm4v": (112 * 112, 28 * 28 * 15000)}
# Video (min_pixels, max_pixels): the transformers video processors' defaults.
_VIDEO_PIXELS = {"qwen2_vl": (128 * 28 * 28, 768 * 28 * 28), "qwen2_5_vl": (128 * 28 * 28, 768 * 28 * 28),
                 "qwen3_vl": (128 * 32 * 32, 768 * 32 * 32)}


def _model_type(config: Any) -> str:
    return getattr(config, "model_type", "") or ""


def _check_size(height: Any, width: Any) -> tuple[int, int]:
    if height is None or width is None:
        raise ValueError("this model's processor sizes every image by its pixels: pass the image's height and width "
                         "(e.g. image_work(config, 480, 640))")
    height, width = as_int(height, "height"), as_int(width, "width")
    if height < 1 or width < 1:
        raise ValueError(f"an image needs a positive size, got {height} x {width} px")
    return height, width


def fit_pixels(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
               frames: int | None = None, temporal: int = 2) -> tuple[int, int]:
    """The size Qwen's ``smart_resize`` gives an image (``frames=None``) or a clip of ``frames`` frames.

    Both sides become multiples of ``factor`` (patch x merge), the nearest ones to the input; if that area is
    above ``max_pixels`` (below ``min_pixels``), both sides are scaled down (up) by the same factor and
    floored (ceiled) to multiples of ``factor``. The clip variant (Qwen3-VL videos, GLM-4V) first scales a
    side shorter than ``factor`` up to it and compares ``frames`` (rounded to a multiple of ``temporal``)
    times the area with the bounds, as the transformers processors of those models do.
    """
    if frames is not None:
        if frames < temporal:
            raise ValueError(f"a clip needs at least {temporal} frames here, got {frames}")
        if height < factor or width < factor:
            up = max(factor / height, factor / width)
            height, width = int(height * up), int(width * up)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"{height} x {width} px: the processor refuses aspect ratios above 200")
    depth = 1 if frames is None else round(frames / temporal) * temporal
    count = 1 if frames is None else frames
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if depth * h * w > max_pixels:
        beta = math.sqrt(count * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif depth * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (count * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _grid_geometry(config: Any) -> tuple[int, int, int]:
    vcfg = config.vision_config
    return int(vcfg.patch_size), int(vcfg.spatial_merge_size), int(vcfg.temporal_patch_size)


def _sum_sq_chunks(n: int, chunk: int) -> int:
    """Sum of squared chunk lengths when ``n`` is cut into chunks of ``chunk`` (the last one shorter)."""
    return (n // chunk) * chunk * chunk + (n % chunk) ** 2


def grid_work(config: Any, grid_t: int, grid_h: int, grid_w: int, *, video: bool = False) -> VisionWork:
    """Tokens and tower work of one input of ``grid_t x grid_h x grid_w`` patches (Qwen / GLM ``grid_thw``).

    The encoder attends within each temporal slice (``grid_h * grid_w`` patches), bidirectionally; Qwen2.5-VL's
    layers outside ``fullatt_block_indexes`` attend within windows of ``window_size`` px of the merged grid
    (``window_size // merge // patch`` merged tokens a side, the last window of a row or column shorter), as
    ``get_vision_window_index`` cuts them. The merger turns ``merge x merge`` patches into one decoder token.
    """
    patch, merge, _ = _grid_geometry(config)
    if grid_h % merge or grid_w % merge:
        raise ValueError(f"grid {grid_h} x {grid_w} is not a multiple of spatial_merge_size={merge}")
    vcfg = config.vision_config
    slice_len = grid_h * grid_w
    layers = int(vcfg.num_hidden_layers if hasattr(vcfg, "num_hidden_layers") else vcfg.depth)
    full_pairs = grid_t * slice_len * slice_len
    pairs = layers * full_pairs
    if _model_type(config) == "qwen2_5_vl":
        full = {i % layers for i in vcfg.fullatt_block_indexes}
        side = int(vcfg.window_size) // merge // patch
        windowed = grid_t * merge**4 * _sum_sq_chunks(grid_h // merge, side) * _sum_sq_chunks(grid_w // merge, side)
        pairs = len(full) * full_pairs + (layers - len(full)) * windowed
    tokens = grid_t * slice_len // (merge * merge)
    return VisionWork(tokens, 1, tokens, images=int(not video), videos=int(video), tower_tokens=grid_t * slice_len,
                      tower_pairs=pairs)


def image_grid(config: Any, height: int, width: int, min_pixels: int | None = None,
               max_pixels: int | None = None) -> tuple[int, int, int]:
    """The ``(t, h, w)`` patch grid the Qwen2-VL / 2.5-VL / 3-VL or GLM-4V image processor gives an image."""
    height, width = _check_size(height, width)
    model_type = _model_type(config)
    patch, merge, temporal = _grid_geometry(config)
    lo, hi = _IMAGE_PIXELS[model_type]
    lo, hi = lo if min_pixels is None else min_pixels, hi if max_pixels is None else max_pixels
    frames = temporal if model_type == "glm4v" else None
    h, w = fit_pixels(height, width, patch * merge, lo, hi, frames=frames, temporal=temporal)
    return 1, h // patch, w // patch


def video_grid(config: Any, frames: int, height: int, width: int, min_pixels: int | None = None,
               max_pixels: int | None = None) -> tuple[int, int, int]:
    """The ``(t, h, w)`` patch grid the Qwen2-VL / 2.5-VL / 3-VL video processor gives ``frames`` sampled frames
    of ``height x width`` px (frames padded to a multiple of ``temporal_patch_size`` by repeating the last;
    the processor's ``cap_pixels_per_frame`` option is not modelled)."""
    height, width = _check_size(height, width)
    model_type = _model_type(config)
    if model_type not in _VIDEO_PIXELS:
        raise ValueError(f"video token counts are modelled for {', '.join(_VIDEO_PIXELS)} (and llava_next_video, "
                         f"llava_onevision), not {model_type!r}")
    patch, merge, temporal = _grid_geometry(config)
    lo, hi = _VIDEO_PIXELS[model_type]
    lo, hi = lo if min_pixels is None else min_pixels, hi if max_pixels is None else max_pixels
    clip = frames if model_type == "qwen3_vl" else None
    h, w = fit_pixels(height, width, patch * merge, lo, hi, frames=clip, temporal=temporal)
    return -(-frames // temporal), h // patch, w // patch


def tile_canvas(height: int, width: int, min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """InternVL's tile grid ``(columns, rows)`` for an image (GotOcr2 image processor, ``crop_to_patches``).

    Among the grids of ``min_tiles .. max_tiles`` tiles (ordered by tile count) the one whose aspect ratio is
    closest to the image's wins; on a tie the later (larger) grid wins while the image's area is more than
    half the grid's area in pixels.
    """
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _internvl_work(config: Any, height: int, width: int, max_tiles: int | None) -> VisionWork:
    height, width = _check_size(height, width)
    vcfg = config.vision_config
    (tile, _), (patch, _) = _pair(vcfg.image_size, "image_size"), _pair(vcfg.patch_size, "patch_size")
    max_tiles = 12 if max_tiles is None else as_int(max_tiles, "max_tiles")
    tiles = 1
    if max_tiles > 1:
        cols, rows = tile_canvas(height, width, 1, max_tiles, tile)
        tiles = 1 if cols * rows == 1 else cols * rows + 1  # plus the thumbnail
    side = tile // patch
    keep = round(side * float(config.downsample_ratio))
    per_tile, seq = keep * keep, side * side + 1  # patches + CLS in the encoder
    layers = int(vcfg.num_hidden_layers)
    return VisionWork(tiles * per_tile, tiles, tiles * per_tile, images=1, tower_tokens=tiles * seq,
                      tower_pairs=tiles * layers * seq * seq, marker_tokens=2)


def _even_up(n: int) -> int:
    return n + n % 2


def _smolvlm_tiles(config: Any, height: int, width: int, longest_edge: int | None) -> int:
    """Tower inputs (tiles + the global image) the Idefics3 / SmolVLM image processor makes of an image."""
    tile = _pair(config.vision_config.image_size, "image_size")[0]
    edge = 4 * tile if longest_edge is None else as_int(longest_edge, "longest_edge")
    aspect = width / height
    # 1. the longest side to `edge` (the other side even), then below 4096 px (MAX_IMAGE_SIZE)
    if width >= height:
        w, h = edge, _even_up(int(edge / aspect))
    else:
        h, w = edge, _even_up(int(edge * aspect))
    h, w = max(h, 1), max(w, 1)
    aspect2 = w / h
    if w >= h and w > 4096:
        w, h = 4096, int(4096 / aspect2)
    elif h > w and h > 4096:
        h, w = 4096, int(4096 * aspect2)
    h, w = max(h, 1), max(w, 1)
    # 2. both sides up to multiples of the tile side
    aspect3 = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect3) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect3) / tile) * tile
    if h > tile or w > tile:
        return (h // tile) * (w // tile) + 1
    return 1


def _smolvlm_work(config: Any, height: int, width: int, longest_edge: int | None) -> VisionWork:
    height, width = _check_size(height, width)
    vcfg = config.vision_config
    side = _pair(vcfg.image_size, "image_size")[0] // _pair(vcfg.patch_size, "patch_size")[0]
    scale = int(config.scale_factor)
    tiles = _smolvlm_tiles(config, height, width, longest_edge)
    per_tile = side * side // (scale * scale)
    seq = side * side
    return VisionWork(tiles * per_tile, tiles, tiles * per_tile, images=1, tower_tokens=tiles * seq,
                      tower_pairs=tiles * int(vcfg.num_hidden_layers) * seq * seq)


def _pixtral_work(config: Any, height: int, width: int, longest_edge: int | None) -> VisionWork:
    height, width = _check_size(height, width)
    vcfg = config.vision_config
    patch, merge = int(vcfg.patch_size), int(config.spatial_merge_size)
    edge = int(vcfg.image_size) if longest_edge is None else as_int(longest_edge, "longest_edge")
    ratio = max(height / edge, width / edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    unit = patch * merge
    rows, cols = -(-height // unit), -(-width // unit)
    patches = rows * cols * merge * merge
    return VisionWork(rows * cols, 1, rows * cols, images=1, tower_tokens=patches,
                      tower_pairs=int(vcfg.num_hidden_layers) * patches * patches, marker_tokens=rows)


def _dynamic_image_work(config: Any, height: Any, width: Any, min_pixels: int | None, max_pixels: int | None,
                        max_tiles: int | None, longest_edge: int | None) -> VisionWork:
    model_type = _model_type(config)
    if model_type in GRID_TYPES:
        return grid_work(config, *image_grid(config, height, width, min_pixels, max_pixels))
    if model_type == "internvl":
        return _internvl_work(config, height, width, max_tiles)
    if model_type in ("smolvlm", "idefics3"):
        return _smolvlm_work(config, height, width, longest_edge)
    return _pixtral_work(config, height, width, longest_edge)
