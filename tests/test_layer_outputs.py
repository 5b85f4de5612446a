"""``output_hidden_states`` and ``output_attentions`` under DPVR-LF (docs/CONTRACT.md rule 9), for LLaVA and the
Qwen-VL classes: after a deep layer a text position holds the text stream (bit for bit), a vision position the side
branch's output; the full layers' entries are stock's; the reference oracle agrees; ``generate`` returns what
``forward`` does; a deep layer's attention rows put all the weight of a text query on text keys."""

from __future__ import annotations

import pytest
import torch
from families import IMAGE as LLAVA_IMAGE
from families import family_batch, tiny_family
from qwen_models import IMAGE as QWEN_IMAGE
from qwen_models import LAYOUTS as QWEN_LAYOUTS
from qwen_models import VIDEO as QWEN_VIDEO
from qwen_models import qwen_batch, tiny_qwen
from tiny import rel_err

import dpvr_kernels
from dpvr_kernels.models.backbone import language_model, side_branch
from dpvr_kernels.reference import reference_forward

R, F, N = 2, 1, 6
LLAVA_LAYOUTS = [["T", "I", "T", "T"], ["T", "T", "I", "T", "I", "T"], ["T", "T", "T"]]


def _case(name: str, attn: str = "sdpa", left_pad: bool = True):
    """A patched tiny model of ``name``, a batch, and its vision mask [B, L] (the routed tokens)."""
    if name == "llava":
        model = tiny_family("llava", attn=attn)
        batch = family_batch(model, LLAVA_LAYOUTS, seed=3, left_pad=left_pad)
        vision = batch["input_ids"] == LLAVA_IMAGE
    else:
        model = tiny_qwen(name)
        if attn != "sdpa":
            model.set_attn_implementation(attn)
        batch = qwen_batch(model, QWEN_LAYOUTS, seed=3, left_pad=left_pad)
        vision = (batch["input_ids"] == QWEN_IMAGE) | (batch["input_ids"] == QWEN_VIDEO)
    vision &= batch["attention_mask"].bool()
    return dpvr_kernels.patch(model, route_layer=R, fusion_layers=F), batch, vision


def _record_streams(model):
    """Hooks that keep each deep layer's packed text output and the side branch's output of the next call."""
    seen: dict = {}

    def keep(key):
        def hook(module, args, out):
            seen[key] = (out[0] if isinstance(out, tuple) else out).clone()  # packed [1, T, D]
        return hook

    lm = language_model(model)
    handles = [lm.layers[i].register_forward_hook(keep(i)) for i in range(R, N - F)]
    handles.append(side_branch(model).register_forward_hook(keep("side")))
    return seen, handles


@pytest.mark.parametrize("left_pad", [True, False])
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_hidden_states_hold_the_text_stream_and_the_side_branch(name, left_pad):
    model, batch, vision = _case(name, left_pad=left_pad)
    valid = batch["attention_mask"].bool()
    text = valid & ~vision
    seen, handles = _record_streams(model)
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == N + 1 and all(h.shape == (*batch["input_ids"].shape, 64) for h in hs)
    for i in range(R, N - F):
        # The packed stream is sample-major in position order: the same order as boolean indexing of [B, L].
        assert torch.equal(hs[i + 1][text], seen[i][0]), f"layer {i}: text positions are not the text stream"
        assert torch.equal(hs[i + 1][vision], seen["side"][0]), f"layer {i}: vision positions != side branch"
    # The last entry is normed: the logits are lm_head of it.
    assert torch.equal(model.lm_head(hs[-1]), out.logits)
    # The layers below the route are stock's (unpatched, same weights, same inputs).
    stock = dpvr_kernels.unpatch(model)
    with torch.no_grad():
        ref_hs = stock(**batch, use_cache=False, output_hidden_states=True).hidden_states
    for i in range(R + 1):
        assert torch.equal(hs[i][valid], ref_hs[i][valid]), f"hidden_states[{i}] differs from stock's"
    # And the per-sample oracle computes every entry the same way (rule 9).
    dpvr_kernels.patch(model, route_layer=R, fusion_layers=F)
    with torch.no_grad():
        _, oracle = reference_forward(model, batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"},
                                      output_hidden_states=True)
    for i in range(N + 1):
        assert rel_err(hs[i], oracle[i], valid) < 1e-5, f"hidden_states[{i}] vs reference_forward"
    # Teeth: stock's deep states are not these (the vision tokens ran through the deep layers there).
    assert rel_err(ref_hs[N - F], hs[N - F], valid) > 1e-3


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_selected_hidden_states(name):
    """transformers' layer capture: an index or a list of them (negative from the end); the rest are None."""
    model, batch, _ = _case(name)
    with torch.no_grad():
        every = model(**batch, use_cache=False, output_hidden_states=True).hidden_states
        some = model(**batch, use_cache=False, output_hidden_states=[1, R + 1, -1]).hidden_states
        one = model(**batch, use_cache=False, output_hidden_states=-2).hidden_states
    assert len(some) == len(one) == N + 1
    assert [i for i, h in enumerate(some) if h is not None] == [1, R + 1, N]
    assert [i for i, h in enumerate(one) if h is not None] == [N - 1]
    for i in (1, R + 1, N):
        assert torch.equal(some[i], every[i])
    assert torch.equal(one[N - 1], every[N - 1])
    # The model's config flag works as the call's does.
    model.config.text_config.output_hidden_states = True
    try:
        with torch.no_grad():
            by_config = model(**batch, use_cache=False).hidden_states
    finally:
        model.config.text_config.output_hidden_states = False
    assert by_config is not None and torch.equal(by_config[R + 2], every[R + 2])


def _generate_positions(name: str, mask: torch.Tensor) -> dict:
    """The positions ``generate`` gives a left-padded LLaVA prompt (count from each sample's first token); the
    Qwen classes derive theirs from the mask in every call."""
    if name != "llava":
        return {}
    return {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_generate_hidden_states_agree_with_forward(name):
    model, batch, _ = _case(name)
    new = 3
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                             output_hidden_states=True)
        prefill = model(**batch, **_generate_positions(name, batch["attention_mask"]),
                        output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    assert len(gen.hidden_states) == new
    for i in range(N + 1):
        assert torch.equal(gen.hidden_states[0][i][valid], prefill[i][valid]), f"prefill hidden_states[{i}]"
    # A decode step's states are the new token's: what a forward over prompt + tokens so far gives at its position.
    L = batch["input_ids"].shape[1]
    for step in (1, 2):
        ids = gen.sequences[:, : L + step + 1]
        kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        mask = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], step + 1, dtype=torch.long)], dim=1)
        if "mm_token_type_ids" in batch:
            kwargs["mm_token_type_ids"] = torch.nn.functional.pad(batch["mm_token_type_ids"], (0, step + 1))
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True,
                         **_generate_positions(name, mask), **kwargs)
        for i in range(N + 1):
            got = gen.hidden_states[step][i]
            assert got.shape == (ids.shape[0], 1, 64)
            assert rel_err(got[:, 0], full.hidden_states[i][:, L + step - 1], torch.ones(ids.shape[0])) < 1e-5


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_deep_layer_attention_puts_text_queries_on_text_keys(name):
    model, batch, vision = _case(name, attn="eager")
    valid = batch["attention_mask"].bool()
    text = valid & ~vision
    with torch.no_grad():
        out = model(**batch, use_cache=False, output_attentions=True, output_hidden_states=True)
        plain = model(**batch, use_cache=False, output_hidden_states=True)
    att = out.attentions
    B, L = batch["input_ids"].shape
    assert len(att) == N and all(a.shape == (B, 4, L, L) for a in att)
    for i in range(R, N - F):
        a = att[i]
        rows = a.sum(-1)  # [B, H, L]
        assert torch.allclose(rows.permute(0, 2, 1)[text], torch.ones(int(text.sum()), 4), atol=1e-5)
        assert torch.all(rows.permute(0, 2, 1)[~text] == 0), "vision and pad rows are zero"
        on_other = a.permute(0, 2, 1, 3)[text][..., :]  # [T, H, L] weights of each text query
        key_text = text[:, None, :].expand(B, L, L)[text]  # [T, L]: is each key a text token of that sample
        assert torch.all(on_other.permute(0, 2, 1)[~key_text] == 0), "a text query weighs a vision or pad key"
        assert torch.all(torch.triu(a, diagonal=1) == 0), "causal"
    # The full layers are stock's weights.
    stock = dpvr_kernels.unpatch(model)
    with torch.no_grad():
        ref = stock(**batch, use_cache=False, output_attentions=True).attentions
    for i in [*range(R)]:
        assert torch.equal(att[i][valid[:, None, :, None].expand_as(att[i])],
                           ref[i][valid[:, None, :, None].expand_as(ref[i])])
    # The weights are the ones the deep layers used: the states equal the ones without output_attentions.
    for i in range(N + 1):
        assert rel_err(out.hidden_states[i], plain.hidden_states[i], valid) < 1e-5


def test_generate_attentions_cover_each_layers_cache():
    model, batch, vision = _case("llava", attn="eager")
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             output_attentions=True)
    step = gen.attentions[1]  # the first decode step: one query, keys = each layer's cache + itself
    text_slots = int((batch["attention_mask"].bool() & ~vision).sum(-1).max())
    for i, a in enumerate(step):
        deep = R <= i < N - F
        assert a.shape[:3] == (batch["input_ids"].shape[0], 4, 1)
        assert a.shape[-1] == (text_slots + 1 if deep else L + 1), f"layer {i}: keys of its own cache"
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)


def test_attentions_need_eager():
    model, batch, _ = _case("llava", attn="sdpa")
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        model(**batch, use_cache=False, output_attentions=True)
