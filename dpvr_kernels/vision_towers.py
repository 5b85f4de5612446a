"""Parameters and FLOPs of the dynamic-resolution vision towers and their projectors (no model is built).

One :class:`Tower` describes a tower family compactly: the patch embedding (a conv, counted as a matmul per
patch), the linear layers every encoder layer applies to every token, the parameters that are no matmul
(norms, position embeddings, CLS, layer scales), and the projector's linear layers (Qwen / GLM patch merger,
InternVL and SmolVLM pixel-shuffle projectors, Mistral3's patch merger + projector), which run on the merged
tokens. :func:`tower_for` builds it from a config:

* ``qwen2_vl``: LayerNorm blocks, fused qkv + proj (bias), MLP fc1 / fc2 (``embed_dim * mlp_ratio``); merger
  LayerNorm + two linears on ``merge ** 2`` concatenated patches.
* ``qwen2_5_vl``: RMSNorm blocks, gated MLP with biases, no patch-embed bias; merger RMSNorm + two linears.
  Window attention in all but ``fullatt_block_indexes`` layers (pairs counted in
  :func:`dpvr_kernels.vision_tokens.grid_work`).
* ``qwen3_vl``: LayerNorm blocks, fc1 / fc2, patch-embed bias, a learned position table
  (``num_position_embeddings``, interpolated: no matmul); the merger (LayerNorm over ``hidden``) plus one
  DeepStack merger (LayerNorm over ``4 * hidden``) per ``deepstack_visual_indexes`` entry, each on every
  merged token.
* ``glm4v``: RMSNorm blocks, fused qkv (``attention_bias``), proj without bias, a gated MLP of width
  ``out_hidden_size`` (sic), position table; ``merge x merge`` conv downsample (counted as a matmul on the
  merged tokens, part of the projector) and a merger: proj, LayerNorm, gated MLP of width
  ``intermediate_size``.
* ``internvl``: InternViT (CLS + patches, absolute position table, LayerNorm or RMSNorm, q/k/v (+ optional
  qk-norm), projection, fc1 / fc2, two layer-scale vectors per layer); projector LayerNorm + two linears on
  the pixel-shuffled tokens (``hidden / downsample_ratio ** 2`` wide).
* ``smolvlm`` / ``idefics3``: SigLIP-style encoder (LayerNorm, q/k/v/out, fc1 / fc2, all biased, position
  table, post-LayerNorm); connector: one bias-free linear on the pixel-shuffled tokens
  (``hidden * scale_factor ** 2`` wide).
* ``mistral3`` (Pixtral tower): RMSNorm blocks, bias-free q/k/v/o, gated MLP; projector RMSNorm, patch
  merger (``hidden * merge ** 2 -> hidden``), two linears (``multimodal_projector_bias``).

Attention FLOPs are ``tower_pairs * 4 * hidden`` (``Q K^T`` and ``P V``; every tower here has
``heads * head_dim == hidden``), with ``tower_pairs`` from the :class:`~dpvr_kernels.vision_tokens.VisionWork`.
HF runs every encoder layer, as :mod:`dpvr_kernels.flops` counts for CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .vision_tokens import VisionWork, _pair

__all__ = ["TOWER_TYPES", "Linear", "Tower", "tower_for"]

#: Model types whose towers this module prices.
TOWER_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "internvl", "smolvlm", "idefics3",
                                "mistral3")


@dataclass(frozen=True)
class Linear:
    """A linear layer (or a conv counted as one): ``n_in -> n_out``, with or without a bias."""

    n_in: int
    n_out: int
    bias: bool = True

    def params(self) -> int:
        """Weights plus bias."""
        return self.n_in * self.n_out + self.n_out * self.bias

    def flops(self, tokens: int) -> int:
        """Matmul FLOPs on ``tokens`` rows: ``2 * tokens * n_in * n_out``."""
        return 2 * tokens * self.n_in * self.n_out


@dataclass(frozen=True)
class Tower:
    """A vision tower and its projector, as counted by the cost model.

    Attributes:
        kind: the model type.
        hidden: encoder width (``heads * head_dim``).
        layers: encoder layers (all run).
        embed: the patch embedding, applied to every patch (not to a CLS token).
        layer_linears: the linear layers of one encoder layer, each applied to every encoder token.
        layer_other_params: parameters of one encoder layer that are no matmul (norms, layer scales).
        fixed_params: parameters outside the layers that are no matmul (position table, CLS, final norms).
        cls: the encoder prepends one CLS token per pass (InternViT).
        projector: linear layers applied to every projector token, once per copy.
        projector_copies: how many mergers run on every projector token (Qwen3-VL: 1 + DeepStack mergers).
        projector_other_params: parameters of all projector copies that are no matmul (norms).
    """

    kind: str
    hidden: int
    layers: int
    embed: Linear
    layer_linears: tuple[Linear, ...]
    layer_other_params: int
    fixed_params: int
    cls: bool
    projector: tuple[Linear, ...]
    projector_copies: int = 1
    projector_other_params: int = 0

    def tower_params(self) -> int:
        """Parameters of the encoder (patch embedding to the last norm)."""
        per_layer = sum(lin.params() for lin in self.layer_linears) + self.layer_other_params
        return self.embed.params() + self.layers * per_layer + self.fixed_params

    def projector_params(self) -> int:
        """Parameters of the projector (patch mergers, pixel-shuffle projectors)."""
        return self.projector_copies * sum(lin.params() for lin in self.projector) + self.projector_other_params

    def params(self) -> int:
        """Tower plus projector parameters."""
        return self.tower_params() + self.projector_params()

    def tower_flops(self, work: VisionWork) -> tuple[int, int]:
        """``(linear + conv FLOPs, attention FLOPs)`` of the encoder for ``work``."""
        patches = work.tower_tokens - self.cls * work.tower_passes
        linear = self.embed.flops(patches)
        linear += self.layers * sum(lin.flops(work.tower_tokens) for lin in self.layer_linears)
        return linear, work.tower_pairs * 2 * 2 * self.hidden

    def projector_flops(self, work: VisionWork) -> int:
        """Matmul FLOPs of the projector on ``work.projector_tokens``."""
        return self.projector_copies * sum(lin.flops(work.projector_tokens) for lin in self.projector)


def _norm(width: int, kind: str) -> int:
    """Parameters of a LayerNorm (weight + bias) or an RMSNorm (weight) of ``width``."""
    return 2 * width if kind == "layer" else width


def _grid_embed(v: Any, hidden: int, bias: bool) -> Linear:
    patch, temporal = int(v.patch_size), int(v.temporal_patch_size)
    return Linear(int(v.in_channels) * temporal * patch * patch, hidden, bias)


def _qwen2_vl(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, m = int(v.embed_dim), int(v.spatial_merge_size)
    i = int(d * float(v.mlp_ratio))
    mlp = (Linear(d, i), Linear(i, d))
    return Tower("qwen2_vl", d, int(v.depth), _grid_embed(v, d, False), (Linear(d, 3 * d), Linear(d, d), *mlp),
                 2 * _norm(d, "layer"), 0, False, (Linear(d * m * m, d * m * m), Linear(d * m * m, int(v.hidden_size))),
                 projector_other_params=_norm(d, "layer"))


def _qwen2_5_vl(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, i, m = int(v.hidden_size), int(v.intermediate_size), int(v.spatial_merge_size)
    mlp = (Linear(d, i), Linear(d, i), Linear(i, d))
    return Tower("qwen2_5_vl", d, int(v.depth), _grid_embed(v, d, False), (Linear(d, 3 * d), Linear(d, d), *mlp),
                 2 * _norm(d, "rms"), 0, False,
                 (Linear(d * m * m, d * m * m), Linear(d * m * m, int(v.out_hidden_size))),
                 projector_other_params=_norm(d, "rms"))


def _qwen3_vl(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, i, m = int(v.hidden_size), int(v.intermediate_size), int(v.spatial_merge_size)
    deepstack = len(v.deepstack_visual_indexes)
    wide = d * m * m
    return Tower("qwen3_vl", d, int(v.depth), _grid_embed(v, d, True),
                 (Linear(d, 3 * d), Linear(d, d), Linear(d, i), Linear(i, d)), 2 * _norm(d, "layer"),
                 int(v.num_position_embeddings) * d, False, (Linear(wide, wide), Linear(wide, int(v.out_hidden_size))),
                 projector_copies=1 + deepstack,
                 projector_other_params=_norm(d, "layer") + deepstack * _norm(wide, "layer"))


def _glm4v(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, i, m, o = int(v.hidden_size), int(v.intermediate_size), int(v.spatial_merge_size), int(v.out_hidden_size)
    side = _pair(v.image_size, "image_size")[0] // int(v.patch_size)
    layer = (Linear(d, 3 * d, bool(v.attention_bias)), Linear(d, d, False), Linear(d, o, False), Linear(d, o, False),
             Linear(o, d, False))
    fixed = side * side * d + 2 * _norm(d, "rms")  # position table; post-conv and post-encoder RMSNorms
    projector = (Linear(d * m * m, o), Linear(o, o, False), Linear(o, i, False), Linear(o, i, False),
                 Linear(i, o, False))
    return Tower("glm4v", d, int(v.depth), _grid_embed(v, d, True), layer, 2 * _norm(d, "rms"), fixed, False,
                 projector, projector_other_params=_norm(o, "layer"))


def _internvl(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, i = int(v.hidden_size), int(v.intermediate_size)
    (ih, iw), (ph, pw) = _pair(v.image_size, "image_size"), _pair(v.patch_size, "patch_size")
    patches = (ih // ph) * (iw // pw)
    norm = "layer" if v.norm_type == "layer_norm" else "rms"
    bias = bool(v.attention_bias)
    layer = (Linear(d, d, bias), Linear(d, d, bias), Linear(d, d, bias), Linear(d, d), Linear(d, i), Linear(i, d))
    other = 2 * _norm(d, norm) + 2 * d + (2 * d if v.use_qk_norm else 0)  # norms, lambda_1/2, q/k RMSNorms
    fixed = d + (patches + 1) * d * bool(v.use_absolute_position_embeddings)  # CLS, position table
    fixed += d * bool(v.use_mask_token) + (0 if v.use_mean_pooling else _norm(d, "layer"))
    wide = d * round(1 / float(config.downsample_ratio)) ** 2
    return Tower("internvl", d, int(v.num_hidden_layers), Linear(int(v.num_channels) * ph * pw, d), layer, other,
                 fixed, True, (Linear(wide, text_hidden), Linear(text_hidden, text_hidden)),
                 projector_other_params=_norm(wide, "layer"))


def _smolvlm(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, i = int(v.hidden_size), int(v.intermediate_size)
    patch = _pair(v.patch_size, "patch_size")[0]
    side = _pair(v.image_size, "image_size")[0] // patch
    layer = (Linear(d, d), Linear(d, d), Linear(d, d), Linear(d, d), Linear(d, i), Linear(i, d))
    scale = int(config.scale_factor)
    return Tower(str(config.model_type), d, int(v.num_hidden_layers), Linear(int(v.num_channels) * patch * patch, d),
                 layer, 2 * _norm(d, "layer"), side * side * d + _norm(d, "layer"), False,
                 (Linear(d * scale * scale, text_hidden, False),))


def _mistral3(config: Any, text_hidden: int) -> Tower:
    v = config.vision_config
    d, i, patch, m = int(v.hidden_size), int(v.intermediate_size), int(v.patch_size), int(config.spatial_merge_size)
    layer = (Linear(d, d, False), Linear(d, d, False), Linear(d, d, False), Linear(d, d, False), Linear(d, i, False),
             Linear(d, i, False), Linear(i, d, False))
    feature_layer = config.vision_feature_layer
    width = d * (1 if isinstance(feature_layer, int) else len(feature_layer))
    bias = bool(config.multimodal_projector_bias)
    projector = (Linear(d * m * m, d, False), Linear(width, text_hidden, bias), Linear(text_hidden, text_hidden, bias))
    return Tower("mistral3", d, int(v.num_hidden_layers), Linear(int(v.num_channels) * patch * patch, d, False),
                 layer, 2 * _norm(d, "rms"), _norm(d, "rms"), False, projector,
                 projector_other_params=_norm(d, "rms"))


_BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "glm4v": _glm4v,
             "internvl": _internvl, "smolvlm": _smolvlm, "idefics3": _smolvlm, "mistral3": _mistral3}


def tower_for(config: Any, text_hidden: int) -> Tower:
    """The :class:`Tower` of a multimodal config of one of :data:`TOWER_TYPES`.

    Raises:
        ValueError: for another model type (names the supported ones and the decoder-only fallback).
    """
    model_type = getattr(config, "model_type", "") or ""
    if model_type not in _BUILDERS:
        raise ValueError(
            f"the vision tower of model_type {model_type!r} is not modelled by dpvr_kernels.vision_towers; supported: "
            f"{', '.join(TOWER_TYPES)}. For the decoder alone (the part DPVR-LF changes), pass config.text_config "
            f"with the number of vision tokens"
        )
    return _BUILDERS[model_type](config, text_hidden)
