"""The paper's saturation profile: how much of the text tokens' attention goes to image tokens, per layer.

DPVR-LF (arXiv 2606.09131) motivates its route layer with this measurement on LLaVA-1.5-7B: the share of
text-to-image attention falls from 0.68 at layer 0 to 0.07 by layer 4 and stays near 0.04 after layer 18,
so image tokens "saturate" in the middle layers and can leave the decoder there.

:func:`attention_to_image_profile` measures that share on a **stock** (unpatched) model from its own
attention weights (eager attention, ``output_attentions=True``), and :func:`suggest_route_layer` turns
a profile into a route layer with a simple documented rule. With random weights (the CLI demo) the
profile has no meaning; use a trained checkpoint for real numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import default_route_layer
from .models.classes import vision_token_ids
from .models.patching import is_patched
from .workloads import prompt_position_ids

__all__ = [
    "PAPER_PROFILE_POINTS",
    "attention_to_image_profile",
    "plot_profile",
    "suggest_route_layer",
]

#: The three points of the saturation curve the paper reports for LLaVA-1.5-7B: ``{layer: share}``
#: (the share is "stays near 0.04" from layer 18 on).
PAPER_PROFILE_POINTS: dict[int, float] = {0: 0.68, 4: 0.07, 18: 0.04}


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Within the block the model uses eager attention, the only one that returns attention weights.

    The whole model switches (the vision tower too: it sees ``output_attentions`` as well and would warn),
    and every sub-config gets its own implementation back afterwards.
    """
    configs = {"": model.config}
    configs.update({key: getattr(model.config, key) for key in ("text_config", "vision_config")
                    if getattr(model.config, key, None) is not None})
    original = {key: cfg._attn_implementation for key, cfg in configs.items()}
    if all(impl == "eager" for impl in original.values()):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter("eager")
    else:  # older transformers: the attention modules read their (shared) config at call time
        for cfg in configs.values():
            cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        if setter is not None:
            setter({key: impl or "sdpa" for key, impl in original.items()})
        else:
            for key, cfg in configs.items():
                cfg._attn_implementation = original[key]


def _query_selection(input_ids: Tensor, attention_mask: Tensor, vision_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(image_keys [B, L], queries [B, L])``: vision (image, video) tokens, and text tokens after at least one."""
    image = torch.zeros_like(attention_mask, dtype=torch.bool)
    for token in vision_ids:
        image |= input_ids == token
    valid = attention_mask.bool()
    text = valid & ~image
    after_image = torch.cumsum((image & valid).long(), dim=-1) > 0
    return image & valid, text & after_image


def attention_to_image_profile(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    pixel_values: Tensor | None,
    position_ids: Tensor | None = None,
    **vision_inputs: Tensor,
) -> list[float]:
    """Per decoder layer, the share of the text tokens' attention mass that lands on image-token keys.

    For each layer ``l`` the value is the mean, over every text query that comes after at least one image
    token in its sample (each such query of each sample counts once) and over every head, of
    ``sum(attention[l][b, h, q, k] for image keys k)``. A value of 1 means text attends only to the image;
    0 means it ignores it. Pad tokens are neither queries nor (under the stock mask) attended keys.

    The weights come from one stock forward with ``output_attentions=True``. Only eager attention returns
    them, so if the language model uses another implementation it is switched to ``"eager"`` for this
    call (``model.set_attn_implementation("eager")``, vision tower included) and restored afterwards.

    Args:
        model: an unpatched model of a supported class (``dpvr_kernels.models.classes``).
        input_ids, attention_mask: ``[B, L]`` prompts holding vision tokens (``config.image_token_id``, and
            ``video_token_id`` where the class has videos; "image" below means either).
        pixel_values: the images of those tokens (``None`` only for a model/prompt without images).
        position_ids: optional; default: ``attention_mask.cumsum(-1) - 1`` (what ``generate`` gives
            left-padded prompts) for 1-D RoPE classes, the model's own M-RoPE positions for Qwen-VL/GLM-4V.
        vision_inputs: the processor's other vision inputs, passed on (``image_grid_thw``, ``image_sizes``,
            ``pixel_values_videos``, ...).

    Returns:
        ``num_hidden_layers`` floats in ``[0, 1]``.

    Raises:
        RuntimeError: if the model is patched by :func:`dpvr_kernels.patch`.
        ValueError: if no text token comes after an image token (nothing to measure).
    """
    if is_patched(model):
        raise RuntimeError(
            "attention_to_image_profile needs the stock model: under DPVR-LF image tokens skip the deep layers, "
            "so there is no per-layer text-to-image attention to measure. Analyze the unpatched model "
            "(dpvr_kernels.unpatch(model), or measure before patching)."
        )
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    image_keys, queries = _query_selection(input_ids, attention_mask, vision_token_ids(model.config))
    if not bool(queries.any()):
        raise ValueError(
            "no text token comes after an image token in this batch, so there is no text-to-image attention "
            "to measure: put text (e.g. the question) after the image tokens"
        )
    if position_ids is None:
        position_ids = prompt_position_ids(model, attention_mask)

    with torch.no_grad(), _eager_attention(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            use_cache=False,
            output_attentions=True,
            return_dict=True,
            **vision_inputs,
        )
    attentions = getattr(out, "attentions", None)
    n_layers = model.config.text_config.num_hidden_layers
    if not attentions or len(attentions) != n_layers:
        got = 0 if not attentions else len(attentions)
        raise RuntimeError(
            f"the model returned {got} attention maps for {n_layers} decoder layers with output_attentions=True "
            "and eager attention; this transformers version/model does not expose them"
        )

    keys = image_keys[:, None, None, :]  # [B, 1, 1, L]
    profile = []
    for attn in attentions:  # [B, H, L, L]
        share = (attn.float() * keys).sum(-1)  # [B, H, L]: image mass per query
        per_query = share.transpose(1, 2)[queries]  # [Q, H]
        profile.append(float(per_query.double().mean()))
    return profile


def suggest_route_layer(
    profile: Sequence[float], fraction: float = 0.1, fusion_layers: int = 1
) -> int | None:
    """Route layer suggested by a saturation profile: where text stops looking at the image.

    Rule: with ``threshold = fraction * profile[0]``, the suggestion is the smallest layer ``r`` in
    ``[0, N - fusion_layers - 1]`` such that every layer ``l`` in ``[r, N - fusion_layers)`` (the layers
    the image tokens would skip under DPVR-LF) has ``profile[l] <= threshold``.

    On the paper's curve (0.68 at layer 0, 0.07 by layer 4, about 0.04 after layer 18), the default
    ``fraction=0.1`` gives a threshold of 0.068, reached just after layer 4: the earliest point at which the
    image tokens have stopped mattering to text. The paper routes later, at layer 18, once the share has
    flattened at 0.04 (about 6 % of layer 0): ``fraction=0.06`` is that more conservative choice.

    Args:
        profile: per-layer shares from :func:`attention_to_image_profile` (``N`` values).
        fraction: threshold relative to the layer-0 share, in ``(0, 1]``.
        fusion_layers: DPVR-LF fusion layers ``f`` (the last ``f`` layers always see the image).

    Returns:
        The route layer, or ``None`` if the share never stays below the threshold up to the fusion layers
        (no saturation: keep the default route layer, or do not route).

    Raises:
        ValueError: for a profile shorter than ``fusion_layers + 1`` layers, a bad ``fraction``, or values
            that are not finite.
    """
    values = [float(v) for v in profile]
    n = len(values)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1] (a share of the layer-0 value), got {fraction}")
    if fusion_layers < 1 or n < fusion_layers + 1:
        raise ValueError(
            f"a profile of {n} layers cannot be routed with fusion_layers={fusion_layers}: need at least "
            f"fusion_layers + 1 layers and fusion_layers >= 1"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError("the profile holds non-finite values")
    threshold = fraction * values[0]
    last = n - fusion_layers  # exclusive end of the layers the image would skip
    suggestion = None
    for r in range(last - 1, -1, -1):  # walk back while the tail stays below the threshold
        if values[r] <= threshold:
            suggestion = r
        else:
            break
    return suggestion


def plot_profile(
    profile: Sequence[float],
    path: str,
    fraction: float = 0.1,
    suggestion: int | None = None,
    fusion_layers: int = 1,
    title: str = "",
) -> None:
    """Save a PNG of the profile with the threshold, the suggested and the default route layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = len(profile)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(n), profile, marker="o", label="text-to-image attention share")
    if n:
        ax.axhline(fraction * profile[0], color="gray", linestyle=":",
                   label=f"threshold {fraction:g} x layer 0 = {fraction * profile[0]:.3f}")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:green", linestyle="--", label=f"suggested route layer {suggestion}")
    if n >= fusion_layers + 1:
        default = default_route_layer(n, fusion_layers)
        ax.axvline(default, color="tab:red", linestyle="-.", alpha=0.6, label=f"default route layer {default}")
    if n > fusion_layers:
        ax.axvspan(n - fusion_layers - 0.5, n - 0.5, color="gray", alpha=0.12, label="fusion layer(s)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of text attention on image tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "DPVR-LF saturation profile", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
