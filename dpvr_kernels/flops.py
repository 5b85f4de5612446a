"""Exact cost model for DPVR-LF: parameters, prefill FLOPs, KV-cache bytes, decode FLOPs.

Covers LLaVA configs (CLIP / SigLIP towers) and, towers included, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V,
InternVL, Idefics3 / SmolVLM and Mistral3 (their towers: :mod:`dpvr_kernels.vision_towers`; their vision
tokens: :mod:`dpvr_kernels.vision_tokens`).

Everything here is plain integer arithmetic on a config (no model is built, no tensor is allocated), so
it works for full-size configs on any machine and every benchmark can print the ideal speedup next to
the measured one.

Semantics (docs/CONTRACT.md)
----------------------------
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
* Vision tower: the patch-embedding conv as a matmul ``[num_patches, C*p*p] x [C*p*p, hidden]``, then
  **all** encoder layers on ``num_patches + 1`` tokens (CLIP: patches + CLS) or ``num_patches`` (SigLIP),
  bidirectional; SigLIP's pooling head where the config enables it. HF runs every layer even though LLaVA
  only uses ``hidden_states[vision_feature_layer]``. The tower runs once per *pass*: an image for LLaVA-1.5,
  each anyres tile plus the base tile for LLaVA-NeXT / -OneVision, each video frame; the projector's two
  linears run on the selected tokens of each pass (NeXT-Video: on the pooled frame tokens). How many
  decoder tokens, passes and projector tokens an image or video gives is
  :mod:`dpvr_kernels.vision_tokens` (anyres unpadding, newline tokens, video pooling).
* Dynamic-resolution towers (:mod:`dpvr_kernels.vision_towers`): the patch embedding on every patch, every
  encoder layer's linears on every encoder token, attention on the allowed pairs the
  :class:`~dpvr_kernels.vision_tokens.VisionWork` counts (per image / tile / temporal slice; Qwen2.5-VL's
  windows), and the mergers / pixel-shuffle projectors ("projector") on the merged tokens; Qwen3-VL's
  DeepStack mergers too (adding their outputs into the decoder is elementwise).
* Vision tower and projector cost the same with and without DPVR-LF.
* A sliding-window attention (Mistral, BakLLaVA's window 4096) is assumed wider than the sequence: the
  counts are exact while the prompt is shorter than the window.

KV cache: ``2 (K and V) * batch * tokens_cached * num_key_value_heads * head_dim * dtype_bytes`` per cached
layer. Stock caches all tokens in all ``N`` layers; DPVR-LF caches all tokens in layers ``[0, r)`` and the
fusion layers, text tokens only in layers ``[r, N - f)``, and nothing for the side branch.

Decode (one new text token per sample): linear and ``lm_head`` FLOPs are the same for stock and DPVR-LF;
the attention FLOPs are proportional to the number of tokens each layer attends to (its cached tokens
plus the new one), which is where DPVR-LF saves work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import as_int, validate_route
from .formatting import fmt_bytes, fmt_count, fmt_si
from .presets import NAMED_CONFIGS, named_config
from .vision_tokens import VisionWork, _pair, is_anyres, tokens_per_image
from .vision_towers import TOWER_TYPES, Tower, tower_for

__all__ = ["CostReport", "cost_model", "route_layer_table"]

_SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text",
                         "glm4v_text")
# The decoders of the M-RoPE classes are these Llama-style layers (their rotary positions cost nothing here).
_TEXT_TYPE_AS = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}
_SUPPORTED_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
_BREAKDOWN_KEYS = (
    "vision_tower",
    "projector",
    "decoder_linear",
    "decoder_attention",
    "side_branch",
    "lm_head",
)


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
    extra_norms: int = 0
    """RMSNorms per layer beyond the two of a Llama layer (GLM-4V: after attention and after the MLP)."""

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
        norms = (2 + self.extra_norms) * h + (2 * self.head_dim if self.qk_norm else 0)
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
    tower: str  # "clip" or "siglip"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    channels: int
    image_hw: tuple[int, int]
    patch_hw: tuple[int, int]
    feature_layers: int
    text_hidden: int
    projector_bias: bool
    projector_norm: bool  # VipLLaVA: LayerNorm over the concatenated feature layers
    newline: bool  # anyres models: one learned image_newline vector
    use_head: bool  # SigLIP's attention-pooling head (off in LLaVA-OneVision)

    @property
    def num_patches(self) -> int:
        return (self.image_hw[0] // self.patch_hw[0]) * (self.image_hw[1] // self.patch_hw[1])

    @property
    def seq_len(self) -> int:
        """Tokens per tower input inside the encoder: patches (+ CLS for CLIP)."""
        return self.num_patches + (self.tower == "clip")

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_hw[0] * self.patch_hw[1]

    @property
    def projector_in(self) -> int:
        return self.hidden * self.feature_layers

    def tower_params(self) -> int:
        d, i = self.hidden, self.intermediate
        layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # q,k,v,out; fc1, fc2; 2 LayerNorms
        if self.tower == "clip":  # class emb, conv (no bias), position emb, pre_layrnorm, post_layernorm
            return d + self.patch_dim * d + self.seq_len * d + 2 * d + self.layers * layer + 2 * d
        params = self.patch_dim * d + d + self.seq_len * d + self.layers * layer + 2 * d  # conv has a bias
        if self.use_head:  # probe, in/out projections of the pooling attention, LayerNorm, MLP
            params += d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * i + i) + (i * d + d)
        return params

    def projector_params(self) -> int:
        t, n = self.text_hidden, self.projector_in
        params = (n * t + t * self.projector_bias) + (t * t + t * self.projector_bias)
        return params + 2 * n * self.projector_norm + t * self.newline

    def tower_flops_per_pass(self) -> tuple[int, int]:
        """``(linear + conv FLOPs, attention FLOPs)`` of the tower for one input (image, tile or frame)."""
        d, i, n = self.hidden, self.intermediate, self.seq_len
        conv = 2 * self.num_patches * self.patch_dim * d
        linear = self.layers * 2 * n * (4 * d * d + 2 * d * i)
        attention = self.layers * n * n * 2 * 2 * d  # bidirectional, heads * head_dim == hidden
        if self.use_head:  # one probe query over the n tokens
            linear += 2 * (d * d + n * 2 * d * d + d * d + 2 * d * i)
            attention += n * 2 * 2 * d
        return conv + linear, attention

    def projector_flops_per_token(self) -> int:
        t = self.text_hidden
        return 2 * (self.projector_in * t + t * t)


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
    model_type = _TEXT_TYPE_AS.get(model_type, model_type)
    if model_type in ("qwen2", "glm4v_text"):
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
        extra_norms=2 if model_type == "glm4v_text" else 0,
    )


def _vision_shape(config: Any, text: _TextShape) -> _VisionShape:
    vcfg = config.vision_config
    vtype = getattr(vcfg, "model_type", "") or ""
    if vtype not in _SUPPORTED_VISION_TYPES:
        raise ValueError(
            f"vision tower model_type {vtype!r} is not modelled by dpvr_kernels.flops; supported: "
            f"{', '.join(_SUPPORTED_VISION_TYPES)} (the CLIP tower of LLaVA-1.5 / -NeXT / VipLLaVA, the SigLIP "
            f"tower of LLaVA-OneVision). For the decoder alone (the part DPVR-LF changes), pass config.text_config "
            f"with the number of vision tokens"
        )
    tokens_per_image(config)  # checks the feature-select strategy
    feature_layer = getattr(config, "vision_feature_layers", getattr(config, "vision_feature_layer", -2))
    feature_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    return _VisionShape(
        tower="siglip" if vtype == "siglip_vision_model" else "clip",
        hidden=int(vcfg.hidden_size),
        intermediate=int(vcfg.intermediate_size),
        layers=int(vcfg.num_hidden_layers),
        heads=int(vcfg.num_attention_heads),
        channels=int(getattr(vcfg, "num_channels", 3)),
        image_hw=_pair(vcfg.image_size, "image_size"),
        patch_hw=_pair(vcfg.patch_size, "patch_size"),
        feature_layers=feature_layers,
        text_hidden=text.hidden,
        projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
        projector_norm=getattr(config, "model_type", "") == "vipllava",
        newline=is_anyres(config),
        use_head=vtype == "siglip_vision_model" and bool(getattr(vcfg, "vision_use_head", True)),
    )


def _resolve_config(config: Any) -> tuple[str, _TextShape, _VisionShape | Tower | None, bool]:
    """Return ``(name, text shape, vision shape or None, tie_word_embeddings)`` for a config or a name."""
    if isinstance(config, str):
        config = named_config(config)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or type(config).__name__
    if (
        getattr(config, "text_config", None) is not None
        and getattr(config, "vision_config", None) is not None
    ):
        text = _text_shape(config.text_config)
        if getattr(config, "model_type", "") in TOWER_TYPES:
            tie = bool(getattr(config, "tie_word_embeddings", False)) or text.tie_word_embeddings
            return name, text, tower_for(config, text.hidden), tie
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


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


@dataclass
class CostReport:
    """Exact cost of one LLaVA prefill (and the following decode step), stock vs DPVR-LF.

    All FLOP and byte counts are totals over the batch; ``image_tokens`` counts every vision token (images
    and videos) per sample, ``images`` / ``videos`` / ``tower_passes`` are totals over the batch. See the module docstring for the
    counting rules. ``flops_breakdown_stock`` / ``flops_breakdown_dpvr`` have the keys ``vision_tower``, ``projector``,
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
    # vision work (whole batch): videos and vision-tower passes (tiles, frames) besides ``images``
    videos: int = 0
    tower_passes: int = 0
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

    def _context(self, context_len: int | None) -> int:
        """Tokens per sample in the stock cache: the prompt length by default, never less."""
        context = self.prompt_len if context_len is None else as_int(context_len, "context_len")
        if context < self.prompt_len:
            raise ValueError(
                f"context_len={context} is shorter than the prompt ({self.prompt_len} tokens per sample); "
                f"pass the number of tokens already cached, at least the prompt length"
            )
        return context

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
        context = self._context(context_len)
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
        context = self._context(context_len)
        n, r, f = self.num_layers, self.route_layer, self.fusion_layers
        per_token_layer = self.kv_bytes_stock // (self.batch * n * self.prompt_len)
        stock_kv = self.batch * per_token_layer * n * context
        dpvr_kv = self.batch * per_token_layer * ((r + f) * context + (n - f - r) * (context - self.image_tokens))
        return self.decode_weight_bytes + stock_kv, self.decode_weight_bytes + dpvr_kv

    def vision_summary(self) -> str:
        """The vision inputs per sample in words: ``"1 image(s) of 576 tokens"``, or for tiled images and
        videos ``"1 image(s), 0 video(s): 2928 tokens from 5 vision-tower passes (576 tokens per tile)"``."""
        images, videos, passes = (v // self.batch for v in (self.images, self.videos, self.tower_passes))
        if not self.tokens_per_image:
            if not passes:
                return "no vision tower"
            return f"{images} image(s), {videos} video(s): {self.image_tokens} tokens from {passes} vision-tower passes"
        if videos == 0 and passes == images and self.image_tokens == images * self.tokens_per_image:
            return f"{images} image(s) of {self.tokens_per_image} tokens"
        return (f"{images} image(s), {videos} video(s): {self.image_tokens} tokens from {passes} vision-tower "
                f"passes ({self.tokens_per_image} tokens per tile)")

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
            + (f", {self.vision_summary()}" if self.tower_passes else ""),
            f"  decoder {n} layers: [0,{r}) all tokens | side branch on image tokens | "
            f"[{r},{n - f}) text only | [{n - f},{n}) fusion, all tokens",
            "",
        ]

        w_name, w_num = 30, 18

        def row(label: str, *cols: str) -> str:
            return f"  {label:<{w_name}}" + "".join(f"{c:>{w_num}}" for c in cols)

        lines.append(row("Parameters", "count", ""))
        lines.append(row("stock total", f"{self.params_total:,}", fmt_count(self.params_total)))
        lines.append(
            row("side branch (1 layer)", f"{self.params_side_branch:,}", fmt_count(self.params_side_branch))
        )
        lines.append(row("DPVR-LF total", f"{self.params_dpvr_total:,}", fmt_count(self.params_dpvr_total)))
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


def _whole_images(config: Any, image_tokens: int, per_image: int) -> VisionWork:
    """An int token count as whole images of one tower pass each (LLaVA-1.5-style configs)."""
    if is_anyres(config):
        raise ValueError(
            f"{getattr(config, 'model_type', 'this')} cuts images into tiles, so {image_tokens} image tokens do not "
            f"say how much vision-tower work made them: pass image_tokens as a VisionWork, e.g. "
            f"dpvr_kernels.vision_tokens.image_work(config, height, width) for one image"
        )
    if image_tokens % per_image:
        lower = image_tokens // per_image * per_image
        raise ValueError(
            f"image_tokens={image_tokens} is not a multiple of the {per_image} tokens per image of this config "
            f"(vision_config image_size / patch_size, feature-select strategy); pass a multiple such as "
            f"{max(lower, per_image)} or {lower + per_image}"
        )
    images = image_tokens // per_image
    return VisionWork(image_tokens, images, image_tokens, images=images)


def cost_model(
    config: Any,
    image_tokens: int | VisionWork,
    text_tokens: int,
    batch: int = 1,
    route_layer: int | None = None,
    fusion_layers: int = 1,
    dtype_bytes: int = 2,
) -> CostReport:
    """Exact parameters, prefill FLOPs, KV-cache bytes and decode FLOPs of stock LLaVA vs DPVR-LF.

    Args:
        config: a transformers LLaVA-family config (``LlavaConfig``, ``LlavaNextConfig``,
            ``LlavaNextVideoConfig``, ``LlavaOnevisionConfig``, ``VipLlavaConfig``: CLIP or SigLIP tower;
            Llama, Mistral, Qwen2 or Qwen3 backbone), a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4V / InternVL /
            Idefics3 / SmolVLM / Mistral3 config (pass ``image_tokens`` as a ``VisionWork``), a plain text
            config of those types (decoder only:
            vision and projector terms are 0), or one of :data:`~dpvr_kernels.presets.NAMED_CONFIGS`.
        image_tokens: the vision (image + video) tokens per sample. Either a
            :class:`~dpvr_kernels.vision_tokens.VisionWork` (from :func:`~dpvr_kernels.vision_tokens.image_work`
            / :func:`~dpvr_kernels.vision_tokens.video_work`, summed over the sample's images and videos),
            which also says how many tower passes and projector tokens make them; or an int, a multiple of
            the tokens per image (one tower pass each; not for anyres configs). 0 is allowed.
        text_tokens: text tokens per sample (every non-vision, non-pad token).
        batch: number of samples, all with the same token counts.
        route_layer: DPVR-LF route layer ``r``; ``None`` for :func:`~dpvr_kernels.config.default_route_layer`.
        fusion_layers: DPVR-LF fusion layers ``f`` (default 1).
        dtype_bytes: bytes per KV-cache element (2 for fp16/bf16).

    Returns:
        A :class:`CostReport`.

    Raises:
        ValueError: bad token counts, a route layer out of range, an int ``image_tokens`` not a multiple of
            the tokens per image or given for an anyres config; the message says how to fix it.
    """
    if isinstance(config, str):
        config = named_config(config)
    name, text, vision, tie = _resolve_config(config)
    work = image_tokens if isinstance(image_tokens, VisionWork) else None
    image_tokens = as_int(work.tokens if work is not None else image_tokens, "image_tokens")
    text_tokens = as_int(text_tokens, "text_tokens")
    batch = as_int(batch, "batch")
    dtype_bytes = as_int(dtype_bytes, "dtype_bytes")
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
    per_image = 0
    vision_flops = projector_flops = 0
    if isinstance(vision, Tower):
        params_total += vision.params()
        if work is None:
            raise ValueError(
                f"{vision.kind} sizes its vision input by each image's pixels, so {image_tokens} image tokens do not "
                f"say how much vision-tower work made them: pass image_tokens as a VisionWork, e.g. "
                f"dpvr_kernels.vision_tokens.image_work(config, height, width) for one image (or pass "
                f"config.text_config for the decoder alone)"
            )
        tower_linear, tower_attn = vision.tower_flops(work)
        vision_flops = batch * (tower_linear + tower_attn)
        projector_flops = batch * vision.projector_flops(work)
    elif vision is not None:
        params_total += vision.tower_params() + vision.projector_params()
        per_image = tokens_per_image(config)
        if work is None:
            work = _whole_images(config, image_tokens, per_image)
        tower_linear, tower_attn = vision.tower_flops_per_pass()
        vision_flops = batch * work.tower_passes * (tower_linear + tower_attn)
        projector_flops = batch * work.projector_tokens * vision.projector_flops_per_token()
    elif work is None:
        work = VisionWork(image_tokens, 0, 0)
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
        images=batch * work.images,
        videos=batch * work.videos,
        tower_passes=batch * work.tower_passes,
        tokens_per_image=per_image,
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
