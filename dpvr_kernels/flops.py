"""Exact cost model for DPVR-LF on LLaVA configs: parameters, prefill FLOPs, KV-cache bytes, decode FLOPs.

Everything here is plain integer arithmetic on a config (no model is built, no tensor is allocated), so
it works for full-size configs on any machine and every benchmark can print the ideal speedup next to
the measured one.

Semantics (DESIGN.md section 2)
-------------------------------
A decoder of ``N`` layers, route layer ``r``, ``f`` fusion layers, ``0 <= r <= N - f - 1``:

* layers ``[0, r)`` run on all tokens (image + text) of each sample;
* the side branch (one decoder layer, a copy of layer ``r``) runs on the image tokens only, causal within
  each sample's image segment, and is never KV-cached;
* layers ``[r, N - f)`` run on the text tokens only, causal among the text tokens of a sample;
* layers ``[N - f, N)`` run on all tokens; then the final norm and ``lm_head`` on all tokens.

The stock model runs all ``N`` layers on all tokens. Padding is not modelled: every sample has exactly
``image_tokens + text_tokens`` tokens.

FLOP counting rules
-------------------
* A matmul ``[m, k] x [k, n]`` costs ``2 * m * k * n`` FLOPs (one multiply + one add per term).
* Only matmuls are counted. Biases, norms (RMSNorm/LayerNorm), activations (SiLU, GELU), softmax, RoPE,
  residual adds, embedding look-ups and the row gathers/scatters of DPVR routing are elementwise or
  memory-bound and are **not** counted.
* Linear layers count ``2 * tokens * in_features * out_features``. Decoder layers: q/o projections use
  ``num_attention_heads * head_dim``, k/v projections use ``num_key_value_heads * head_dim`` (GQA), and
  the MLP's gate, up and down projections. ``lm_head`` runs on **all** ``batch * (image + text)`` tokens
  (what the stock LLaVA forward computes for logits).
* Attention counts ``Q K^T`` and ``P V`` for the query-key pairs the mask allows, each pair costing
  ``2 * head_dim * num_attention_heads`` FLOPs for ``Q K^T`` plus the same for ``P V``. Causal over a
  segment of ``n`` tokens allows ``n * (n + 1) / 2`` pairs; bidirectional allows ``n * n`` pairs. Dense
  kernels that compute masked-out pairs (eager attention, SDPA's math path) do more work than this;
  the count here is the ideal one.
* CLIP vision tower: the patch-embedding conv as a matmul ``[num_patches, C*p*p] x [C*p*p, hidden]``,
  then **all** encoder layers on ``num_patches + 1`` tokens (patches + CLS), bidirectional. HF runs every
  layer even though LLaVA only uses ``hidden_states[vision_feature_layer]`` (``-2``). The projector's two
  linears run on the selected tokens (CLS dropped for the ``"default"`` strategy).
* Vision tower and projector cost the same with and without DPVR-LF.
* A sliding-window attention (Mistral) is assumed wider than the sequence.

KV cache: ``2 (K and V) * batch * tokens_cached * num_key_value_heads * head_dim * dtype_bytes`` per cached
layer. Stock caches all tokens in all ``N`` layers; DPVR-LF caches all tokens in layers ``[0, r)`` and the
fusion layers, text tokens only in layers ``[r, N - f)``, and nothing for the side branch.

Decode (one new text token per sample): linear and ``lm_head`` FLOPs are the same for stock and DPVR-LF;
the attention FLOPs are proportional to the number of tokens each layer attends to (its cached tokens
plus the new one), which is where DPVR-LF saves work.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NAMED_CONFIGS",
    "TYPICAL_IMAGE_TOKENS",
    "CostReport",
    "cost_model",
    "default_route_layer",
    "named_config",
    "route_layer_table",
    "scaled_config",
    "validate_route",
]

#: Names accepted by :func:`named_config` (and by :func:`cost_model` in place of a config).
NAMED_CONFIGS: tuple[str, ...] = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b")

#: Image tokens per sample that each named model typically sees (LLaVA-NeXT: 5 crops x 576 at most).
TYPICAL_IMAGE_TOKENS: dict[str, int] = {"llava-1.5-7b": 576, "llava-1.5-13b": 576, "llava-next-7b": 2880}

_SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_SUPPORTED_VISION_TYPES = ("clip_vision_model",)
_BREAKDOWN_KEYS = (
    "vision_tower",
    "projector",
    "decoder_linear",
    "decoder_attention",
    "side_branch",
    "lm_head",
)


# --------------------------------------------------------------------------------------------------------
# Route validation
# --------------------------------------------------------------------------------------------------------


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _check_fusion(num_layers: int, fusion_layers: int) -> tuple[int, int]:
    num_layers = _as_int(num_layers, "num_layers")
    fusion_layers = _as_int(fusion_layers, "fusion_layers")
    if num_layers < 2:
        raise ValueError(
            f"DPVR-LF needs a decoder of at least 2 layers (one text-only layer and one fusion layer); "
            f"got num_layers={num_layers}"
        )
    if not 1 <= fusion_layers <= num_layers - 1:
        raise ValueError(
            f"fusion_layers={fusion_layers} is out of range for a {num_layers}-layer decoder: valid values "
            f"are 1 <= fusion_layers <= {num_layers - 1} (at least one fusion layer, and at least one "
            f"layer before fusion); the default is 1"
        )
    return num_layers, fusion_layers


def default_route_layer(num_layers: int, fusion_layers: int = 1) -> int:
    """Default route layer: ``round(num_layers * 18 / 32)`` clamped into ``[0, num_layers - fusion_layers - 1]``.

    This is the paper's saturation point (layer 18 of 32 for LLaVA-1.5-7B) scaled to the decoder depth.
    ``round`` is Python's (ties to even), e.g. 40 layers give 22.

    Args:
        num_layers: number of decoder layers ``N``.
        fusion_layers: number of final fusion layers ``f`` (default 1).

    Returns:
        The route layer ``r``.

    Raises:
        ValueError: if the decoder is too shallow or ``fusion_layers`` is out of range.
    """
    num_layers, fusion_layers = _check_fusion(num_layers, fusion_layers)
    return max(0, min(round(num_layers * 18 / 32), num_layers - fusion_layers - 1))


def validate_route(num_layers: int, route_layer: int | None, fusion_layers: int = 1) -> tuple[int, int]:
    """Check (and default) a route layer / fusion layer pair for an ``num_layers``-layer decoder.

    Args:
        num_layers: number of decoder layers ``N``.
        route_layer: route layer ``r``, or ``None`` for :func:`default_route_layer`.
        fusion_layers: number of final fusion layers ``f``.

    Returns:
        ``(route_layer, fusion_layers)`` as ints, with ``0 <= route_layer <= num_layers - fusion_layers - 1``.

    Raises:
        ValueError: naming the valid range and how to fix the call.
    """
    num_layers, fusion_layers = _check_fusion(num_layers, fusion_layers)
    if route_layer is None:
        return default_route_layer(num_layers, fusion_layers), fusion_layers
    route_layer = _as_int(route_layer, "route_layer")
    last = num_layers - fusion_layers - 1
    if not 0 <= route_layer <= last:
        raise ValueError(
            f"route_layer={route_layer} is out of range for a {num_layers}-layer decoder with "
            f"fusion_layers={fusion_layers}: valid values are 0 <= route_layer <= {last} "
            f"(num_layers - fusion_layers - 1, so that at least one text-only layer runs before fusion). "
            f"Pick a layer in that range, lower fusion_layers, or pass route_layer=None for the default "
            f"({default_route_layer(num_layers, fusion_layers)})."
        )
    return route_layer, fusion_layers


# --------------------------------------------------------------------------------------------------------
# Config shapes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool
    q_bias: bool
    k_bias: bool
    v_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two RMSNorms, optional q/k norms)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = (h * q + q * self.q_bias) + (h * kv + kv * self.k_bias) + (h * kv + kv * self.v_bias)
        attn += q * h + h * self.o_bias
        mlp = 2 * (h * i + i * self.mlp_bias) + (i * h + h * self.mlp_bias)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + mlp + norms

    def layer_linear_flops_per_token(self) -> int:
        """Matmul FLOPs of one decoder layer's projections (q, k, v, o, gate, up, down) for one token."""
        h = self.hidden
        return 2 * (h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * self.intermediate)

    def attention_flops_per_pair(self) -> int:
        """FLOPs of one allowed query-key pair in one layer: Q K^T plus P V over all heads."""
        return 2 * 2 * self.heads * self.head_dim

    def lm_head_flops_per_token(self) -> int:
        return 2 * self.hidden * self.vocab

    def kv_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        return 2 * self.kv_dim * dtype_bytes


@dataclass(frozen=True)
class _VisionShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    channels: int
    image_hw: tuple[int, int]
    patch_hw: tuple[int, int]
    feature_layers: int
    strategy: str
    text_hidden: int
    projector_bias: bool

    @property
    def num_patches(self) -> int:
        return (self.image_hw[0] // self.patch_hw[0]) * (self.image_hw[1] // self.patch_hw[1])

    @property
    def seq_len(self) -> int:
        """Tokens per image inside the CLIP encoder: patches + CLS."""
        return self.num_patches + 1

    @property
    def tokens_per_image(self) -> int:
        """Image tokens per image given to the decoder (CLS dropped for the "default" strategy)."""
        return self.num_patches if self.strategy == "default" else self.num_patches + 1

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_hw[0] * self.patch_hw[1]

    @property
    def projector_in(self) -> int:
        return self.hidden * self.feature_layers

    def tower_params(self) -> int:
        d, i = self.hidden, self.intermediate
        embeddings = d + self.patch_dim * d + self.seq_len * d  # class emb, conv (no bias), position emb
        layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # q,k,v,out; fc1, fc2; 2 LayerNorms
        return embeddings + 2 * d + self.layers * layer + 2 * d  # + pre_layrnorm, post_layernorm

    def projector_params(self) -> int:
        t = self.text_hidden
        return (self.projector_in * t + t * self.projector_bias) + (t * t + t * self.projector_bias)

    def tower_flops_per_image(self) -> tuple[int, int]:
        """``(linear + conv FLOPs, attention FLOPs)`` of the CLIP tower for one image."""
        d, i, n = self.hidden, self.intermediate, self.seq_len
        conv = 2 * self.num_patches * self.patch_dim * d
        linear = self.layers * 2 * n * (4 * d * d + 2 * d * i)
        attention = self.layers * n * n * 2 * 2 * d  # bidirectional, heads * head_dim == hidden
        return conv + linear, attention

    def projector_flops_per_image(self) -> int:
        t = self.text_hidden
        return 2 * self.tokens_per_image * (self.projector_in * t + t * t)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"vision_config.{name} must be an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _text_shape(cfg: Any) -> _TextShape:
    model_type = getattr(cfg, "model_type", "") or ""
    if model_type not in _SUPPORTED_TEXT_TYPES:
        raise ValueError(
            f"text backbone model_type {model_type!r} is not modelled by dpvr_kernels.flops; supported: "
            f"{', '.join(_SUPPORTED_TEXT_TYPES)} (Llama-style decoder layers)"
        )
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else int(kv_heads)
    head_dim = getattr(cfg, "head_dim", None)
    head_dim = hidden // heads if head_dim is None else int(head_dim)
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    if model_type == "qwen2":
        q_bias = k_bias = v_bias = True
        o_bias = False
    elif model_type == "mistral":
        q_bias = k_bias = v_bias = o_bias = False
    else:
        q_bias = k_bias = v_bias = o_bias = attention_bias
    return _TextShape(
        model_type=model_type,
        hidden=hidden,
        intermediate=int(cfg.intermediate_size),
        layers=int(cfg.num_hidden_layers),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(cfg.vocab_size),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
    )


def _vision_shape(config: Any, text: _TextShape) -> _VisionShape:
    vcfg = config.vision_config
    vtype = getattr(vcfg, "model_type", "") or ""
    if vtype not in _SUPPORTED_VISION_TYPES:
        raise ValueError(
            f"vision tower model_type {vtype!r} is not modelled by dpvr_kernels.flops; supported: "
            f"{', '.join(_SUPPORTED_VISION_TYPES)} (the CLIP tower of LLaVA-1.5 / LLaVA-NeXT)"
        )
    feature_layer = getattr(config, "vision_feature_layer", -2)
    feature_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    image_hw = _pair(vcfg.image_size, "image_size")
    patch_hw = _pair(vcfg.patch_size, "patch_size")
    return _VisionShape(
        hidden=int(vcfg.hidden_size),
        intermediate=int(vcfg.intermediate_size),
        layers=int(vcfg.num_hidden_layers),
        heads=int(vcfg.num_attention_heads),
        channels=int(getattr(vcfg, "num_channels", 3)),
        image_hw=image_hw,
        patch_hw=patch_hw,
        feature_layers=feature_layers,
        strategy=strategy,
        text_hidden=text.hidden,
        projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
    )


def _resolve_config(config: Any) -> tuple[str, _TextShape, _VisionShape | None, bool]:
    """Return ``(name, text shape, vision shape or None, tie_word_embeddings)`` for a config or a name."""
    if isinstance(config, str):
        config = named_config(config)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or type(config).__name__
    if (
        getattr(config, "text_config", None) is not None
        and getattr(config, "vision_config", None) is not None
    ):
        text = _text_shape(config.text_config)
        vision = _vision_shape(config, text)
        tie = bool(getattr(config, "tie_word_embeddings", False)) or text.tie_word_embeddings
        return name, text, vision, tie
    if hasattr(config, "hidden_size") and hasattr(config, "num_hidden_layers"):
        text = _text_shape(config)
        return name, text, None, text.tie_word_embeddings
    raise TypeError(
        f"cost_model needs a LlavaConfig, a Llama/Mistral/Qwen2-style text config or one of "
        f"{NAMED_CONFIGS}; got {type(config).__name__}"
    )


def tokens_per_image(config: Any) -> int:
    """Image tokens the decoder sees per image of a LLaVA config (0 for a text-only config)."""
    vision = _resolve_config(config)[2]
    return vision.tokens_per_image if vision is not None else 0


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def fmt_si(value: float, unit: str, digits: int = 3) -> str:
    """``1.234e12, "FLOP"`` -> ``"1.234 TFLOP"``."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _count(value: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {suffix}"
    return f"{value:.0f}"


def fmt_bytes(value: float) -> str:
    """Bytes in binary units: ``"203.00 MiB"``."""
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:.0f} B"


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


@dataclass
class CostReport:
    """Exact cost of one LLaVA prefill (and the following decode step), stock vs DPVR-LF.

    All FLOP and byte counts are totals over the batch. See the module docstring for the counting rules.
    ``flops_breakdown_stock`` / ``flops_breakdown_dpvr`` have the keys ``vision_tower``, ``projector``,
    ``decoder_linear`` (the backbone's own layers' projections), ``decoder_attention``, ``side_branch``
    (linear + attention of the side branch; 0 for stock) and ``lm_head``.
    """

    model: str
    batch: int
    image_tokens: int
    text_tokens: int
    images: int
    tokens_per_image: int
    num_layers: int
    route_layer: int
    fusion_layers: int
    dtype_bytes: int
    # parameters
    params_total: int
    params_side_branch: int
    params_dpvr_total: int
    trainable_fraction: float
    side_branch_fraction_of_stock: float
    # prefill FLOPs
    flops_breakdown_stock: dict[str, int] = field(default_factory=dict)
    flops_breakdown_dpvr: dict[str, int] = field(default_factory=dict)
    flops_stock: int = 0
    flops_dpvr: int = 0
    ideal_prefill_speedup: float = 0.0
    flops_decoder_stock: int = 0
    flops_decoder_dpvr: int = 0
    ideal_decoder_speedup: float = 0.0
    # KV cache
    kv_bytes_stock: int = 0
    kv_bytes_dpvr: int = 0
    kv_savings: float = 0.0
    # decode: per-token constants (per sample) and the first decode step after the prompt (whole batch)
    decode_linear_flops_per_token: int = 0
    attention_flops_per_pair: int = 0
    decode_flops_stock: int = 0
    decode_flops_dpvr: int = 0
    ideal_decode_speedup: float = 0.0
    ideal_decode_attention_speedup: float = 0.0
    # decode is memory-bound: bytes read per step (decoder weights + lm_head once, plus the whole KV cache)
    decode_weight_bytes: int = 0
    decode_bytes_stock: int = 0
    decode_bytes_dpvr: int = 0
    ideal_decode_bytes_speedup: float = 0.0

    @property
    def prompt_len(self) -> int:
        """Tokens per sample in the prompt (image + text)."""
        return self.image_tokens + self.text_tokens

    def decode_flops_per_token(self, context_len: int | None = None) -> tuple[int, int]:
        """FLOPs of one decode step (one new text token per sample, whole batch), ``(stock, dpvr)``.

        Args:
            context_len: tokens per sample already in the **stock** KV cache (prompt + tokens generated so
                far); default: the prompt length. DPVR-LF's text-only layers hold
                ``context_len - image_tokens`` of them. The new token attends to its cached tokens plus
                itself in every layer.

        Returns:
            ``(stock_flops, dpvr_flops)``: linear + lm_head FLOPs are equal, attention FLOPs differ.
        """
        context = self.prompt_len if context_len is None else _as_int(context_len, "context_len")
        if context < self.prompt_len:
            raise ValueError(
                f"context_len={context} is shorter than the prompt ({self.prompt_len} tokens per sample); "
                f"pass the number of tokens already cached, at least the prompt length"
            )
        n, r, f = self.num_layers, self.route_layer, self.fusion_layers
        full_layers = r + f
        text_layers = n - f - r
        stock_attn = n * (context + 1)
        dpvr_attn = full_layers * (context + 1) + text_layers * (context - self.image_tokens + 1)
        base = self.decode_linear_flops_per_token
        pair = self.attention_flops_per_pair
        return self.batch * (base + pair * stock_attn), self.batch * (base + pair * dpvr_attn)

    def decode_bytes_per_step(self, context_len: int | None = None) -> tuple[int, int]:
        """Bytes one decode step reads (whole batch), ``(stock, dpvr)``: the weights it runs (decoder layers,
        final norm, lm_head; the side branch does not run in decode) once, plus every cached K/V element.

        Args:
            context_len: tokens per sample in the **stock** cache, as in :meth:`decode_flops_per_token`.
        """
        context = self.prompt_len if context_len is None else _as_int(context_len, "context_len")
        if context < self.prompt_len:
            raise ValueError(
                f"context_len={context} is shorter than the prompt ({self.prompt_len} tokens per sample); "
                f"pass the number of tokens already cached, at least the prompt length"
            )
        n, r, f = self.num_layers, self.route_layer, self.fusion_layers
        per_token_layer = self.kv_bytes_stock // (self.batch * n * self.prompt_len)
        stock_kv = self.batch * per_token_layer * n * context
        dpvr_kv = self.batch * per_token_layer * ((r + f) * context + (n - f - r) * (context - self.image_tokens))
        return self.decode_weight_bytes + stock_kv, self.decode_weight_bytes + dpvr_kv

    def as_dict(self) -> dict[str, Any]:
        """All fields as a JSON-friendly dict (breakdowns copied), plus ``prompt_len``."""
        out = dataclasses.asdict(self)
        out["prompt_len"] = self.prompt_len
        return out

    def as_table(self) -> str:
        """A readable, aligned plain-text table of the report."""
        n, r, f = self.num_layers, self.route_layer, self.fusion_layers
        lines = [
            f"DPVR-LF cost model: {self.model}",
            f"  batch {self.batch} x ({self.image_tokens} image + {self.text_tokens} text tokens)"
            + (
                f", {self.images} image(s) of {self.tokens_per_image} tokens" if self.tokens_per_image else ""
            ),
            f"  decoder {n} layers: [0,{r}) all tokens | side branch on image tokens | "
            f"[{r},{n - f}) text only | [{n - f},{n}) fusion, all tokens",
            "",
        ]

        w_name, w_num = 30, 18

        def row(label: str, *cols: str) -> str:
            return f"  {label:<{w_name}}" + "".join(f"{c:>{w_num}}" for c in cols)

        lines.append(row("Parameters", "count", ""))
        lines.append(row("stock total", f"{self.params_total:,}", _count(self.params_total)))
        lines.append(
            row("side branch (1 layer)", f"{self.params_side_branch:,}", _count(self.params_side_branch))
        )
        lines.append(row("DPVR-LF total", f"{self.params_dpvr_total:,}", _count(self.params_dpvr_total)))
        lines.append(row("trainable (of DPVR-LF total)", f"{100 * self.trainable_fraction:.3f} %", ""))
        lines.append(
            row("side branch / stock total", f"{100 * self.side_branch_fraction_of_stock:.3f} %", "")
        )
        lines.append("")
        lines.append(row("Prefill FLOPs", "stock", "DPVR-LF", "DPVR/stock"))
        for key in _BREAKDOWN_KEYS:
            s, d = self.flops_breakdown_stock[key], self.flops_breakdown_dpvr[key]
            lines.append(
                row(
                    key.replace("_", " "), fmt_si(s, "FLOP"), fmt_si(d, "FLOP"), f"{_ratio(d, s):.4f}" if s else "-"
                )
            )
        lines.append(
            row(
                "total",
                fmt_si(self.flops_stock, "FLOP"),
                fmt_si(self.flops_dpvr, "FLOP"),
                f"{_ratio(self.flops_dpvr, self.flops_stock):.4f}",
            )
        )
        lines.append(
            row(
                "decoder only (no vision/proj)",
                fmt_si(self.flops_decoder_stock, "FLOP"),
                fmt_si(self.flops_decoder_dpvr, "FLOP"),
                f"{_ratio(self.flops_decoder_dpvr, self.flops_decoder_stock):.4f}",
            )
        )
        lines.append(row("ideal prefill speedup", f"{self.ideal_prefill_speedup:.3f}x", ""))
        lines.append(row("ideal decoder-only speedup", f"{self.ideal_decoder_speedup:.3f}x", ""))
        lines.append("")
        lines.append(row(f"KV cache ({self.dtype_bytes} B/elem)", "stock", "DPVR-LF", "savings"))
        lines.append(
            row(
                "bytes",
                fmt_bytes(self.kv_bytes_stock),
                fmt_bytes(self.kv_bytes_dpvr),
                f"{100 * self.kv_savings:.2f} %",
            )
        )
        lines.append("")
        lines.append(row(f"First decode step (ctx {self.prompt_len})", "stock", "DPVR-LF", "speedup"))
        lines.append(
            row(
                "FLOPs per step (whole batch)",
                fmt_si(self.decode_flops_stock, "FLOP"),
                fmt_si(self.decode_flops_dpvr, "FLOP"),
                f"{self.ideal_decode_speedup:.4f}x",
            )
        )
        lines.append(row("attention FLOPs only", "", "", f"{self.ideal_decode_attention_speedup:.4f}x"))
        lines.append(
            row(
                "bytes read per step",
                fmt_bytes(self.decode_bytes_stock),
                fmt_bytes(self.decode_bytes_dpvr),
                f"{self.ideal_decode_bytes_speedup:.4f}x",
            )
        )
        return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------------------


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def cost_model(
    config: Any,
    image_tokens: int,
    text_tokens: int,
    batch: int = 1,
    route_layer: int | None = None,
    fusion_layers: int = 1,
    dtype_bytes: int = 2,
) -> CostReport:
    """Exact parameters, prefill FLOPs, KV-cache bytes and decode FLOPs of stock LLaVA vs DPVR-LF.

    Args:
        config: a transformers ``LlavaConfig`` (CLIP vision tower; Llama, Mistral, Qwen2 or Qwen3 backbone),
            a plain text config of those types (decoder only: vision and projector terms are 0), or one of
            :data:`NAMED_CONFIGS`.
        image_tokens: image tokens per sample; with a LlavaConfig a multiple of the tokens per image
            (``(image_size / patch_size) ** 2``, plus 1 for the ``"full"`` strategy). 0 is allowed.
        text_tokens: text tokens per sample (every non-image, non-pad token).
        batch: number of samples, all with the same token counts.
        route_layer: DPVR-LF route layer ``r``; ``None`` for :func:`default_route_layer`.
        fusion_layers: DPVR-LF fusion layers ``f`` (default 1).
        dtype_bytes: bytes per KV-cache element (2 for fp16/bf16).

    Returns:
        A :class:`CostReport`.

    Raises:
        ValueError: bad token counts, a route layer out of range, or ``image_tokens`` not a multiple of
            the tokens per image; the message says how to fix it.
    """
    name, text, vision, tie = _resolve_config(config)
    image_tokens = _as_int(image_tokens, "image_tokens")
    text_tokens = _as_int(text_tokens, "text_tokens")
    batch = _as_int(batch, "batch")
    dtype_bytes = _as_int(dtype_bytes, "dtype_bytes")
    if image_tokens < 0 or text_tokens < 0:
        raise ValueError(
            f"token counts must be >= 0, got image_tokens={image_tokens}, text_tokens={text_tokens} "
            f"(they are per-sample counts)"
        )
    if image_tokens + text_tokens == 0:
        raise ValueError("image_tokens + text_tokens must be > 0: an empty prompt has no cost to model")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1 (2 for fp16/bf16, 4 for fp32), got {dtype_bytes}")
    route_layer, fusion_layers = validate_route(text.layers, route_layer, fusion_layers)

    n_layers, r, f = text.layers, route_layer, fusion_layers
    text_layers = n_layers - f - r
    total_tokens = image_tokens + text_tokens  # per sample

    # ---- parameters ---------------------------------------------------------------------------------
    layer_params = text.layer_params()
    embed = text.vocab * text.hidden
    params_total = embed + n_layers * layer_params + text.hidden + (0 if tie else embed)
    images = 0
    tokens_per_image = 0
    vision_flops = projector_flops = 0
    if vision is not None:
        params_total += vision.tower_params() + vision.projector_params()
        tokens_per_image = vision.tokens_per_image
        if image_tokens % tokens_per_image:
            lower = image_tokens // tokens_per_image * tokens_per_image
            raise ValueError(
                f"image_tokens={image_tokens} is not a multiple of the {tokens_per_image} tokens per image "
                f"(image {vision.image_hw[0]}x{vision.image_hw[1]} px, patch "
                f"{vision.patch_hw[0]}x{vision.patch_hw[1]}, strategy {vision.strategy!r}); pass a "
                f"multiple such as {max(lower, tokens_per_image)} or {lower + tokens_per_image}"
            )
        images = batch * (image_tokens // tokens_per_image)
        tower_linear, tower_attn = vision.tower_flops_per_image()
        vision_flops = images * (tower_linear + tower_attn)
        projector_flops = images * vision.projector_flops_per_image()
    params_side = layer_params
    params_dpvr = params_total + params_side

    # ---- prefill FLOPs ------------------------------------------------------------------------------
    lin = text.layer_linear_flops_per_token()
    pair = text.attention_flops_per_pair()
    lm_head = batch * total_tokens * text.lm_head_flops_per_token()

    stock = {
        "vision_tower": vision_flops,
        "projector": projector_flops,
        "decoder_linear": batch * n_layers * total_tokens * lin,
        "decoder_attention": batch * n_layers * _causal_pairs(total_tokens) * pair,
        "side_branch": 0,
        "lm_head": lm_head,
    }
    full_layers = r + f
    dpvr = {
        "vision_tower": vision_flops,
        "projector": projector_flops,
        "decoder_linear": batch * lin * (full_layers * total_tokens + text_layers * text_tokens),
        "decoder_attention": batch
        * pair
        * (full_layers * _causal_pairs(total_tokens) + text_layers * _causal_pairs(text_tokens)),
        "side_branch": batch * (image_tokens * lin + _causal_pairs(image_tokens) * pair),
        "lm_head": lm_head,
    }
    flops_stock = sum(stock.values())
    flops_dpvr = sum(dpvr.values())
    dec_stock = flops_stock - vision_flops - projector_flops
    dec_dpvr = flops_dpvr - vision_flops - projector_flops

    # ---- KV cache -----------------------------------------------------------------------------------
    kv_tok = text.kv_bytes_per_token_layer(dtype_bytes)
    kv_stock = batch * kv_tok * n_layers * total_tokens
    kv_dpvr = batch * kv_tok * (full_layers * total_tokens + text_layers * text_tokens)

    report = CostReport(
        model=name,
        batch=batch,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        images=images,
        tokens_per_image=tokens_per_image,
        num_layers=n_layers,
        route_layer=r,
        fusion_layers=f,
        dtype_bytes=dtype_bytes,
        params_total=params_total,
        params_side_branch=params_side,
        params_dpvr_total=params_dpvr,
        trainable_fraction=params_side / params_dpvr,
        side_branch_fraction_of_stock=params_side / params_total,
        flops_breakdown_stock=stock,
        flops_breakdown_dpvr=dpvr,
        flops_stock=flops_stock,
        flops_dpvr=flops_dpvr,
        ideal_prefill_speedup=flops_stock / flops_dpvr,
        flops_decoder_stock=dec_stock,
        flops_decoder_dpvr=dec_dpvr,
        ideal_decoder_speedup=dec_stock / dec_dpvr,
        kv_bytes_stock=kv_stock,
        kv_bytes_dpvr=kv_dpvr,
        kv_savings=1 - kv_dpvr / kv_stock,
        decode_linear_flops_per_token=n_layers * lin + text.lm_head_flops_per_token(),
        attention_flops_per_pair=pair,
    )
    d_stock, d_dpvr = report.decode_flops_per_token()
    report.decode_flops_stock = d_stock
    report.decode_flops_dpvr = d_dpvr
    report.ideal_decode_speedup = d_stock / d_dpvr
    base = batch * report.decode_linear_flops_per_token
    report.ideal_decode_attention_speedup = _ratio(d_stock - base, d_dpvr - base)
    lm_head_params = text.vocab * text.hidden  # read in decode whether or not it is tied to the embeddings
    report.decode_weight_bytes = dtype_bytes * (n_layers * layer_params + text.hidden + lm_head_params)
    b_stock, b_dpvr = report.decode_bytes_per_step()
    report.decode_bytes_stock, report.decode_bytes_dpvr = b_stock, b_dpvr
    report.ideal_decode_bytes_speedup = b_stock / b_dpvr
    return report


def route_layer_table(
    config: Any,
    image_tokens: int,
    text_tokens: int,
    batch: int = 1,
    fusion_layers: int = 1,
    dtype_bytes: int = 2,
) -> list[dict[str, Any]]:
    """DPVR-LF cost for every valid route layer ``r`` in ``[0, N - fusion_layers - 1]``.

    Returns:
        One dict per route layer with ``route_layer``, ``text_only_layers``, ``flops_stock``, ``flops_dpvr``,
        ``ideal_prefill_speedup``, ``ideal_decoder_speedup``, ``kv_bytes_stock``, ``kv_bytes_dpvr``,
        ``kv_savings`` and ``ideal_decode_speedup``.
    """
    _, text, _, _ = _resolve_config(config)
    _, fusion_layers = validate_route(text.layers, None, fusion_layers)
    rows = []
    for r in range(text.layers - fusion_layers):
        rep = cost_model(config, image_tokens, text_tokens, batch, r, fusion_layers, dtype_bytes)
        rows.append(
            {
                "route_layer": r,
                "text_only_layers": text.layers - fusion_layers - r,
                "flops_stock": rep.flops_stock,
                "flops_dpvr": rep.flops_dpvr,
                "ideal_prefill_speedup": rep.ideal_prefill_speedup,
                "ideal_decoder_speedup": rep.ideal_decoder_speedup,
                "kv_bytes_stock": rep.kv_bytes_stock,
                "kv_bytes_dpvr": rep.kv_bytes_dpvr,
                "kv_savings": rep.kv_savings,
                "ideal_decode_speedup": rep.ideal_decode_speedup,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------
# Named and scaled configs
# --------------------------------------------------------------------------------------------------------


def _llava_config(
    *,
    name: str,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    image_token_id: int,
    vision_hidden: int = 1024,
    vision_intermediate: int = 4096,
    vision_layers: int = 24,
    vision_heads: int = 16,
    image_size: int = 336,
    patch_size: int = 14,
    max_position_embeddings: int = 4096,
) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg.name_or_path = name
    return cfg


def named_config(name: str) -> Any:
    """A ``LlavaConfig`` with the exact shapes of a public LLaVA checkpoint (random weights when built).

    * ``"llava-1.5-7b"``: Vicuna-7B (hidden 4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads,
      vocab 32064) + CLIP ViT-L/14-336 (hidden 1024, intermediate 4096, 24 layers, 16 heads; 336 px,
      patch 14: 576 image tokens), projector 1024 -> 4096 -> 4096 with GELU, image_token_id 32000,
      ``vision_feature_layer=-2``, strategy ``"default"``.
    * ``"llava-1.5-13b"``: Vicuna-13B (hidden 5120, intermediate 13824, 40 layers, 40 heads) + the same
      vision tower.
    * ``"llava-next-7b"``: the Vicuna-7B backbone and CLIP tower of LLaVA-1.5-7B. LLaVA-NeXT's "anyres"
      gives up to 2880 image tokens per sample (5 crops x 576); :func:`cost_model` treats that as 5 images
      of 576 tokens. The NeXT-specific ``image_newline`` parameter and its per-row newline tokens, and
      the unpadding of crops, are not modelled (this is a ``LlavaConfig``, not a ``LlavaNextConfig``).

    Raises:
        ValueError: for an unknown name (lists :data:`NAMED_CONFIGS`).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in ("llava-1.5-7b", "llava-next-7b"):
        return _llava_config(
            name=key,
            hidden=4096,
            intermediate=11008,
            layers=32,
            heads=32,
            kv_heads=32,
            vocab=32064,
            image_token_id=32000,
        )
    if key == "llava-1.5-13b":
        return _llava_config(
            name=key,
            hidden=5120,
            intermediate=13824,
            layers=40,
            heads=40,
            kv_heads=40,
            vocab=32064,
            image_token_id=32000,
        )
    raise ValueError(f"unknown config name {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")


def scaled_config(
    hidden: int = 1024,
    layers: int = 16,
    heads: int = 16,
    intermediate: int | None = None,
    kv_heads: int | None = None,
    vocab: int = 32064,
    vision_hidden: int = 256,
    vision_intermediate: int | None = None,
    vision_layers: int = 4,
    vision_heads: int = 4,
    image_size: int = 168,
    patch_size: int = 14,
    image_token_id: int | None = None,
    name: str | None = None,
) -> Any:
    """A LLaVA-1.5-shaped ``LlavaConfig`` scaled down for CPU demos and tests.

    The default is a 16-layer, 1024-wide Llama decoder with a 4-layer, 256-wide CLIP tower on 168 px
    images with patch 14, i.e. 12 x 12 = 144 image tokens per image.

    Args:
        hidden, layers, heads: decoder width, depth and attention heads.
        intermediate: decoder MLP width; default keeps LLaVA-1.5-7B's ratio (11008 / 4096), rounded up to a
            multiple of 64.
        kv_heads: KV heads (GQA); default ``heads``.
        vocab: vocabulary size.
        vision_hidden, vision_intermediate, vision_layers, vision_heads: CLIP tower shape;
            ``vision_intermediate`` defaults to ``4 * vision_hidden``.
        image_size, patch_size: image and patch side in pixels; tokens per image ``(image_size // patch_size) ** 2``.
        image_token_id: default 32000 if it fits the vocabulary, else ``vocab - 1``.
        name: name shown in reports; default ``"llava-scaled-h{hidden}-l{layers}"``.

    Raises:
        ValueError: if a size is not positive, heads do not divide the widths, or the image is not a
            whole number of patches.
    """
    if intermediate is None:
        intermediate = -(-hidden * 11008 // (4096 * 64)) * 64
    if kv_heads is None:
        kv_heads = heads
    if vision_intermediate is None:
        vision_intermediate = 4 * vision_hidden
    sizes = {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "intermediate": intermediate,
        "kv_heads": kv_heads,
        "vocab": vocab,
        "vision_hidden": vision_hidden,
        "vision_intermediate": vision_intermediate,
        "vision_layers": vision_layers,
        "vision_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    for key, value in sizes.items():
        if _as_int(value, key) <= 0:
            raise ValueError(f"scaled_config: {key} must be > 0, got {value}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"scaled_config: heads={heads} must divide hidden={hidden} and kv_heads={kv_heads} must divide heads"
        )
    if vision_hidden % vision_heads:
        raise ValueError(
            f"scaled_config: vision_heads={vision_heads} must divide vision_hidden={vision_hidden}"
        )
    if image_size % patch_size:
        raise ValueError(
            f"scaled_config: image_size={image_size} must be a multiple of patch_size={patch_size} "
            f"(e.g. {image_size // patch_size * patch_size or patch_size})"
        )
    if image_token_id is None:
        image_token_id = 32000 if vocab > 32000 else vocab - 1
    if not 0 <= image_token_id < vocab:
        raise ValueError(f"scaled_config: image_token_id={image_token_id} must be in [0, vocab={vocab})")
    return _llava_config(
        name=name or f"llava-scaled-h{hidden}-l{layers}",
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        image_token_id=image_token_id,
        vision_hidden=vision_hidden,
        vision_intermediate=vision_intermediate,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
