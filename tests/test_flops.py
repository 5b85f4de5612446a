"""Tests for dpvr_kernels.flops: exact parameter counts, FLOPs, KV bytes and bad-input errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from dpvr_kernels.config import default_route_layer, validate_route
from dpvr_kernels.flops import CostReport, cost_model, route_layer_table
from dpvr_kernels.presets import NAMED_CONFIGS, named_config, scaled_config
from dpvr_kernels.vision_tokens import image_work

IMAGE_TOKEN = 127


def tiny_config(text_config=None, **overrides) -> LlavaConfig:
    if text_config is None:
        text_config = LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    kwargs = dict(
        text_config=text_config,
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=4,
    )
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def meta_param_count(cls, cfg) -> int:
    with torch.device("meta"):
        model = cls(cfg)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# LLaVA-1.5-7B headline numbers
# ---------------------------------------------------------------------------------------------------------


def test_llava_15_7b_headline_numbers():
    rep = cost_model(named_config("llava-1.5-7b"), image_tokens=576, text_tokens=64, route_layer=18)
    assert rep.route_layer == 18 and rep.fusion_layers == 1 and rep.num_layers == 32
    assert rep.params_side_branch == 202_383_360 == 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert rep.params_total == 7_063_427_072
    assert rep.params_dpvr_total == rep.params_total + rep.params_side_branch
    # side branch / (stock + side branch) = 2.785 %: "about 3%", 2.8 % to one decimal
    assert 0.0275 <= rep.trainable_fraction <= 0.029
    assert round(100 * rep.trainable_fraction, 1) == 2.8
    assert rep.trainable_fraction == rep.params_side_branch / rep.params_dpvr_total
    assert round(rep.side_branch_fraction_of_stock, 3) == 0.029  # the paper's "2.9%"
    assert rep.kv_savings == 1 - (19 * 640 + 13 * 64) / (32 * 640)
    assert abs(rep.kv_savings - 0.3656) < 1e-4
    assert rep.images == 1 and rep.tokens_per_image == 576


def test_llava_15_7b_default_route_layer_is_18():
    assert default_route_layer(32) == 18
    assert cost_model("llava-1.5-7b", 576, 64).route_layer == 18


def test_llava_15_7b_kv_bytes_exact():
    rep = cost_model("llava-1.5-7b", 576, 64, batch=3, route_layer=18, dtype_bytes=2)
    per_token_layer = 2 * 32 * 128 * 2  # K and V, kv heads, head dim, fp16
    assert rep.kv_bytes_stock == 3 * 32 * 640 * per_token_layer
    assert rep.kv_bytes_dpvr == 3 * (19 * 640 + 13 * 64) * per_token_layer


def test_llava_15_7b_prefill_flops_by_hand():
    rep = cost_model("llava-1.5-7b", 576, 64, route_layer=18)
    h, i, v, n = 4096, 11008, 32064, 32
    lin = 2 * (4 * h * h + 3 * h * i)
    pair = 4 * h
    assert rep.flops_breakdown_stock["decoder_linear"] == n * 640 * lin
    assert rep.flops_breakdown_stock["decoder_attention"] == n * 640 * 641 // 2 * pair
    assert rep.flops_breakdown_dpvr["decoder_linear"] == (19 * 640 + 13 * 64) * lin
    assert rep.flops_breakdown_dpvr["decoder_attention"] == (19 * 640 * 641 // 2 + 13 * 64 * 65 // 2) * pair
    assert rep.flops_breakdown_dpvr["side_branch"] == 576 * lin + 576 * 577 // 2 * pair
    assert rep.flops_breakdown_stock["lm_head"] == rep.flops_breakdown_dpvr["lm_head"] == 2 * 640 * h * v
    # CLIP ViT-L/14-336: 577 tokens, 24 layers, all run; conv as a matmul; projector on 576 tokens
    d, di, t = 1024, 4096, 577
    vision = 2 * 576 * (3 * 14 * 14) * d + 24 * (2 * t * (4 * d * d + 2 * d * di) + t * t * 4 * d)
    assert rep.flops_breakdown_stock["vision_tower"] == rep.flops_breakdown_dpvr["vision_tower"] == vision
    assert rep.flops_breakdown_stock["projector"] == 2 * 576 * (d * h + h * h)
    assert rep.flops_stock == sum(rep.flops_breakdown_stock.values())
    assert rep.flops_dpvr == sum(rep.flops_breakdown_dpvr.values())
    assert rep.ideal_prefill_speedup == rep.flops_stock / rep.flops_dpvr
    assert rep.ideal_decoder_speedup > rep.ideal_prefill_speedup > 1


# ---------------------------------------------------------------------------------------------------------
# Parameter counts pinned against real models (meta device)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_params_total_matches_meta_model_named(name):
    cfg = named_config(name)
    rep = cost_model(cfg, image_work(cfg, 336, 336), 64)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    assert rep.params_total == sum(p.numel() for p in model.parameters())
    decoder = getattr(model.model, "language_model", None) or model.model.text_model  # SmolVLM: text_model
    layer = decoder.layers[rep.route_layer]
    assert rep.params_side_branch == sum(p.numel() for p in layer.parameters())


def _tiny_variants():
    llama = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return {
        "llama": tiny_config(),
        "llama-tied": tiny_config(LlamaConfig(**llama, tie_word_embeddings=True)),
        "llama-bias-headdim": tiny_config(
            LlamaConfig(**llama, attention_bias=True, mlp_bias=True, head_dim=8)
        ),
        "mistral": tiny_config(MistralConfig(**llama)),
        "qwen2": tiny_config(Qwen2Config(**llama)),
        "qwen3": tiny_config(Qwen3Config(**llama, head_dim=16)),
        "full-strategy-no-proj-bias": tiny_config(
            vision_feature_select_strategy="full", multimodal_projector_bias=False
        ),
        "two-feature-layers": tiny_config(vision_feature_layer=[-2, -1]),
    }


@pytest.mark.parametrize("variant", list(_tiny_variants()))
def test_params_total_matches_meta_model_tiny(variant):
    cfg = _tiny_variants()[variant]
    tokens_per_image = 5 if cfg.vision_feature_select_strategy == "full" else 4
    rep = cost_model(cfg, 2 * tokens_per_image, 7)
    assert rep.params_total == meta_param_count(LlavaForConditionalGeneration, cfg)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    assert rep.params_side_branch == sum(p.numel() for p in model.model.language_model.layers[0].parameters())


def test_params_scaled_config_matches_meta_model():
    cfg = scaled_config()
    assert cfg.image_seq_length == 144
    rep = cost_model(cfg, 144, 32)
    assert rep.tokens_per_image == 144 and rep.images == 1
    assert rep.params_total == meta_param_count(LlavaForConditionalGeneration, cfg)
    assert rep.num_layers == 16 and rep.route_layer == 9


def test_text_only_config():
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, vocab_size=128
    )
    rep = cost_model(cfg, image_tokens=10, text_tokens=6)
    assert rep.params_total == meta_param_count(LlamaForCausalLM, cfg)
    assert rep.flops_breakdown_stock["vision_tower"] == rep.flops_breakdown_stock["projector"] == 0
    assert rep.images == 0 and rep.tokens_per_image == 0
    assert rep.ideal_prefill_speedup == rep.ideal_decoder_speedup > 1


# ---------------------------------------------------------------------------------------------------------
# FLOPs checked against torch's FlopCounterMode on real forwards of the tiny model
# ---------------------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.convolution")


def _counts(counter: FlopCounterMode, module: str, ops) -> int:
    table = counter.get_flop_counts().get(module, {})
    return sum(n for op, n in table.items() if str(op) in ops)


def _tiny_eager_model(cfg):
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()


def _sample_ids(batch: int, images: int, text: int) -> tuple[torch.Tensor, list[str]]:
    """Interleave roles: half the text, the image tokens, the rest of the text."""
    roles = ["text"] * (text // 2) + ["image"] * (4 * images) + ["text"] * (text - text // 2)
    ids = torch.tensor(
        [[IMAGE_TOKEN if r == "image" else 1 + (j % 100) for j, r in enumerate(roles)]] * batch
    )
    return ids, roles


def test_stock_flops_match_flop_counter():
    cfg = tiny_config()
    model = _tiny_eager_model(cfg)
    batch, images, text = 2, 2, 7
    ids, _ = _sample_ids(batch, images, text)
    pixel_values = torch.randn(batch * images, 3, 28, 28)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, pixel_values=pixel_values)

    rep = cost_model(cfg, image_tokens=4 * images, text_tokens=text, batch=batch)
    st = rep.flops_breakdown_stock
    # linear layers + patch conv: everything in the stock count except attention
    vision_attn = _counts(counter, "LlavaForConditionalGeneration.model.vision_tower", ("aten.bmm",))
    assert vision_attn == batch * images * 2 * 5 * 5 * 4 * 32  # bidirectional, 5 tokens, 2 layers
    measured_linear = _counts(counter, "Global", MATMUL_OPS)
    assert (
        measured_linear
        == st["vision_tower"] - vision_attn + st["projector"] + st["decoder_linear"] + st["lm_head"]
    )
    # eager attention computes all L*L pairs; the cost model counts the L*(L+1)/2 causal ones
    length, pair, layers = 4 * images + text, 4 * 64, 4
    measured_dense = _counts(counter, "LlavaForConditionalGeneration.model.language_model", ("aten.bmm",))
    assert measured_dense == batch * layers * length * length * pair
    assert 2 * st["decoder_attention"] - batch * layers * length * pair == measured_dense
    assert _counts(counter, "Global", ("aten.bmm",)) == vision_attn + measured_dense


def _allowed_pairs(roles: list[str], layer_kind: str) -> int:
    """Count allowed query-key pairs from an explicit DPVR-LF mask for one sample."""
    n = len(roles)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if layer_kind == "full":
        return int(causal.sum())
    keep = torch.tensor([r == layer_kind for r in roles])
    mask = causal & keep[:, None] & keep[None, :]
    return int(mask.sum())


@pytest.mark.parametrize("route_layer", [0, 1, 2])
def test_dpvr_flops_match_flop_counter(route_layer):
    cfg = tiny_config()
    model = _tiny_eager_model(cfg)
    lm = model.model.language_model
    batch, images, text, fusion = 2, 3, 9, 1
    ids, roles = _sample_ids(batch, images, text)
    image_pos = [j for j, r in enumerate(roles) if r == "image"]
    text_pos = [j for j, r in enumerate(roles) if r == "text"]
    side_branch = copy.deepcopy(lm.layers[route_layer])
    n_layers = len(lm.layers)

    def run(layers, hidden, positions):
        pos = torch.tensor([positions] * batch)
        emb = lm.rotary_emb(hidden, pos)
        for layer in layers:
            hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
        return hidden

    full = list(range(len(roles)))
    with torch.no_grad():
        hidden = lm.embed_tokens(ids)
        with FlopCounterMode(display=False) as counter:
            hidden = run(lm.layers[:route_layer], hidden, full)
            image_out = run([side_branch], hidden[:, image_pos], image_pos)
            text_out = run(lm.layers[route_layer : n_layers - fusion], hidden[:, text_pos], text_pos)
            hidden = hidden.clone()
            hidden[:, image_pos] = image_out
            hidden[:, text_pos] = text_out
            hidden = run(lm.layers[n_layers - fusion :], hidden, full)
            model.lm_head(lm.norm(hidden))

    rep = cost_model(cfg, image_tokens=4 * images, text_tokens=text, batch=batch, route_layer=route_layer)
    pair = 4 * 64
    pairs = (route_layer + fusion) * _allowed_pairs(roles, "full")
    pairs += (n_layers - fusion - route_layer) * _allowed_pairs(roles, "text")
    pairs += _allowed_pairs(roles, "image")
    measured_linear = _counts(counter, "Global", MATMUL_OPS)
    assert measured_linear + batch * pairs * pair == rep.flops_decoder_dpvr
    dp = rep.flops_breakdown_dpvr
    assert dp["side_branch"] == batch * (12 * 61440 + 12 * 13 // 2 * pair)

    # the stock decoder, counted the same way
    stock_linear = batch * len(roles) * (n_layers * 61440 + 2 * 64 * 128)
    stock_pairs = n_layers * _allowed_pairs(roles, "full")
    assert stock_linear + batch * stock_pairs * pair == rep.flops_decoder_stock
    assert rep.flops_dpvr < rep.flops_stock


# ---------------------------------------------------------------------------------------------------------
# Monotonicity, decode, route table, formatting
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["llava-1.5-7b", tiny_config()], ids=["7b", "tiny"])
def test_speedup_grows_with_image_share(config):
    per_image = 576 if isinstance(config, str) else 4
    reps = [cost_model(config, k * per_image, 64) for k in range(6)]
    assert reps[0].flops_dpvr == reps[0].flops_stock and reps[0].ideal_prefill_speedup == 1.0
    for prev, cur in zip(reps[1:], reps[2:], strict=False):
        assert cur.flops_dpvr < cur.flops_stock
        assert cur.ideal_prefill_speedup > prev.ideal_prefill_speedup
        assert cur.ideal_decoder_speedup > prev.ideal_decoder_speedup
        assert cur.kv_savings > prev.kv_savings
    assert reps[1].flops_dpvr < reps[1].flops_stock


def test_decode_flops():
    rep = cost_model("llava-1.5-7b", 576, 64, batch=2, route_layer=18)
    stock, dpvr = rep.decode_flops_per_token()
    assert (stock, dpvr) == (rep.decode_flops_stock, rep.decode_flops_dpvr)
    pair = 4 * 4096
    assert stock - dpvr == 2 * pair * 13 * 576  # 13 text-only layers skip the 576 cached image tokens
    assert rep.decode_linear_flops_per_token == 32 * 2 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 4096 * 32064
    assert stock == 2 * (rep.decode_linear_flops_per_token + pair * 32 * 641)
    assert rep.ideal_decode_speedup == stock / dpvr > 1
    later_stock, later_dpvr = rep.decode_flops_per_token(1000)
    assert later_stock > stock and later_stock - later_dpvr == stock - dpvr
    with pytest.raises(ValueError, match="shorter than the prompt"):
        rep.decode_flops_per_token(100)


def test_decode_bytes():
    rep = cost_model("llava-1.5-7b", 576, 64, batch=4, route_layer=18, dtype_bytes=2)
    layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096  # q, k, v, o; gate, up, down; two RMSNorms
    weights = 2 * (32 * layer + 4096 + 32064 * 4096)
    assert rep.decode_weight_bytes == weights
    per_token_layer = 2 * 32 * 128 * 2
    assert rep.decode_bytes_stock == weights + rep.kv_bytes_stock == weights + 4 * 32 * 640 * per_token_layer
    assert rep.decode_bytes_dpvr == weights + rep.kv_bytes_dpvr
    assert rep.ideal_decode_bytes_speedup == rep.decode_bytes_stock / rep.decode_bytes_dpvr > 1
    later_stock, later_dpvr = rep.decode_bytes_per_step(700)
    assert later_stock - later_dpvr == rep.decode_bytes_stock - rep.decode_bytes_dpvr  # the image tokens skipped
    # the KV share, hence the ideal, grows with the batch
    assert cost_model("llava-1.5-7b", 576, 64, batch=32).ideal_decode_bytes_speedup > rep.ideal_decode_bytes_speedup
    with pytest.raises(ValueError, match="shorter than the prompt"):
        rep.decode_bytes_per_step(10)


def test_llava_next_672px_image_is_five_tower_passes_and_2928_tokens():
    cfg = named_config("llava-next-7b")
    work = image_work(cfg, 672, 672)
    # base tile 576 + the 2 x 2 tiles' 48 x 48 patch grid + one newline per grid row
    assert (work.tokens, work.tower_passes, work.projector_tokens) == (576 + 48 * 48 + 48, 5, 5 * 576)
    rep = cost_model(cfg, work, 64)
    assert rep.images == 1 and rep.tower_passes == 5 and rep.image_tokens == 2928
    one = cost_model("llava-1.5-7b", 576, 64)
    assert rep.flops_breakdown_stock["vision_tower"] == 5 * one.flops_breakdown_stock["vision_tower"]
    assert rep.flops_breakdown_stock["projector"] == 5 * one.flops_breakdown_stock["projector"]
    assert rep.params_total == one.params_total + 4096  # the learned image_newline vector
    with pytest.raises(ValueError, match="image_work"):
        cost_model(cfg, 2880, 64)  # an int says nothing about the tiles behind it


def test_route_layer_table():
    rows = route_layer_table("llava-1.5-7b", 576, 64)
    assert [row["route_layer"] for row in rows] == list(range(31))
    row18 = rows[18]
    rep = cost_model("llava-1.5-7b", 576, 64, route_layer=18)
    assert row18["flops_dpvr"] == rep.flops_dpvr and row18["kv_bytes_dpvr"] == rep.kv_bytes_dpvr
    assert row18["ideal_prefill_speedup"] == rep.ideal_prefill_speedup
    assert row18["kv_savings"] == rep.kv_savings and row18["text_only_layers"] == 13
    for a, b in zip(rows, rows[1:], strict=False):
        assert a["flops_dpvr"] < b["flops_dpvr"]
        assert a["kv_savings"] > b["kv_savings"]
    assert len(route_layer_table(tiny_config(), 4, 4, fusion_layers=2)) == 2


def test_as_table_and_as_dict():
    rep = cost_model("llava-1.5-7b", 576, 64, route_layer=18)
    assert isinstance(rep, CostReport)
    table = rep.as_table()
    for needle in (
        "llava-1.5-7b",
        "202,383,360",
        "side branch",
        "lm head",
        "ideal prefill speedup",
        "36.56 %",
    ):
        assert needle in table
    d = rep.as_dict()
    json.dumps(d)
    assert d["params_side_branch"] == 202_383_360 and d["prompt_len"] == 640
    assert d["flops_breakdown_dpvr"] == rep.flops_breakdown_dpvr


def test_default_route_layer():
    assert default_route_layer(32) == 18
    assert default_route_layer(40) == 22  # round(22.5) ties to even
    assert default_route_layer(16) == 9
    assert default_route_layer(4) == 2
    assert default_route_layer(2) == 0
    assert default_route_layer(4, fusion_layers=3) == 0
    assert default_route_layer(32, fusion_layers=14) == 17  # clamped to N - f - 1
    assert validate_route(32, None) == (18, 1)
    assert validate_route(32, 30, 1) == (30, 1)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route_layer", [-1, 31, 32, 100])
def test_route_layer_out_of_range(route_layer):
    with pytest.raises(ValueError, match=r"0 <= route_layer <= 30") as info:
        cost_model("llava-1.5-7b", 576, 64, route_layer=route_layer)
    assert "route_layer=None" in str(info.value)


def test_bad_fusion_and_types():
    with pytest.raises(ValueError, match="fusion_layers"):
        validate_route(32, 10, 0)
    with pytest.raises(ValueError, match="fusion_layers"):
        validate_route(32, None, 32)
    with pytest.raises(ValueError, match="0 <= route_layer <= 27"):
        validate_route(32, 29, 4)
    with pytest.raises(ValueError, match="integer"):
        validate_route(32, 1.5)
    with pytest.raises(ValueError, match="integer"):
        validate_route(32, True)
    with pytest.raises(ValueError, match="at least 2 layers"):
        default_route_layer(1)


@pytest.mark.parametrize(
    ("image_tokens", "text_tokens", "batch", "match"),
    [
        (-576, 64, 1, ">= 0"),
        (576, -1, 1, ">= 0"),
        (0, 0, 1, "must be > 0"),
        (576, 64, 0, "batch must be >= 1"),
        (600, 64, 1, r"not a multiple of the 576 tokens per image.*576 or 1152"),
        (100, 64, 1, r"not a multiple.*576"),
    ],
)
def test_bad_token_counts(image_tokens, text_tokens, batch, match):
    with pytest.raises(ValueError, match=match):
        cost_model("llava-1.5-7b", image_tokens, text_tokens, batch=batch)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown config name.*llava-1.5-7b"):
        named_config("llava-2-70b")
    with pytest.raises(TypeError, match="LlavaConfig"):
        cost_model(object(), 576, 64)
    with pytest.raises(ValueError, match="not a multiple of the 4 tokens per image"):
        cost_model(tiny_config(), 6, 4)
    with pytest.raises(ValueError, match="image_size=30 must be a multiple of patch_size=14"):
        scaled_config(image_size=30)
