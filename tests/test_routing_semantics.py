"""Routing semantics found by Hugging Face's own LLaVA testers (issue 11, B1-B4): what is a vision token, the
cache's public queries for any route layer, batches without text, padding-free packed rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_generation import reference_loop
from tiny import IMAGE_TOKEN, make_batch, rel_err, tiny_llava

import dpvr_kernels
from dpvr_kernels.models.backbone import CACHE_KW
from dpvr_kernels.plan import build_route_plan_from_mask, packed_sequence_ids
from dpvr_kernels.reference import reference_forward

PROMPTS = [["T", "I", "T", "T"], ["T", "T", "I", "T", "T", "T", "T"], ["T", "T", "T"]]


def _cache_of(out):
    return getattr(out, CACHE_KW, None) if hasattr(out, CACHE_KW) else out.past_key_values


# --- B1: a vision token is one the call carries vision features for -------------------------------------------


def test_generated_image_token_id_is_text_like_stock():
    model = tiny_llava()
    model.generation_config.suppress_tokens = None
    ids, mask, pv = make_batch(PROMPTS, seed=1)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=4, do_sample=False,
              sequence_bias={(IMAGE_TOKEN,): 100.0})
    with torch.no_grad():
        stock = model.generate(**kw)
    assert (stock[:, ids.shape[1]:] == IMAGE_TOKEN).all()  # the bias makes the model emit the image id
    dpvr_kernels.patch(model, route_layer=3)
    with torch.no_grad():
        out = model.generate(**kw)
    ref, _ = reference_loop(model, ids, mask, pv, 4, suppress=(), bias={IMAGE_TOKEN: 100.0})
    assert torch.equal(out, ref)


def test_image_token_ids_without_pixel_values_are_text():
    ids, mask, _ = make_batch([["T", "I", "T"], ["T", "T", "I"]])  # image ids, but no images in the call
    model = tiny_llava()
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits  # stock embeds them as text
        dpvr_kernels.patch(model, route_layer=2)
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = reference_forward(model, ids, None, mask)
        all_text = reference_forward(model, ids, None, mask, vision_mask=torch.zeros_like(mask, dtype=torch.bool))
    assert torch.equal(ref, all_text)
    assert rel_err(out, ref, mask) < 1e-5
    assert rel_err(out, stock, mask) < 1e-5  # nothing routed to the side branch: the stock computation


# --- B2: the cache answers with the stock meaning for any route layer --------------------------------------------


@pytest.mark.parametrize("route_layer,layers", [(0, 2), (0, 6), (3, 6)])
def test_continue_generation_from_returned_cache(route_layer, layers):
    model = dpvr_kernels.patch(tiny_llava(layers=layers), route_layer=route_layer)
    ids, mask, pv = make_batch(PROMPTS, seed=4)
    with torch.no_grad():
        first = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=3,
                               do_sample=False, return_dict_in_generate=True)
        cache = _cache_of(first)
        assert isinstance(cache, dpvr_kernels.DPVRCache)
        held = ids.shape[1] + 2  # the last token is not fed yet
        assert cache.get_seq_length() == held
        assert cache.get_seq_length(route_layer) == held  # stock meaning for a deep layer too
        assert cache.get_mask_sizes(1, route_layer) == (held + 1, 0)
        assert cache.get_query_offset(route_layer) == held
        more = torch.cat([mask, torch.ones(len(PROMPTS), 3, dtype=mask.dtype)], 1)
        second = model.generate(input_ids=first.sequences, attention_mask=more, max_new_tokens=1, do_sample=False,
                                **{CACHE_KW: cache})
        once = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=4, do_sample=False)
    assert torch.equal(second, once)


def test_cache_crop_and_batch_select_keep_the_deep_layers_consistent():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch(PROMPTS, seed=6)
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=5, do_sample=False,
                              return_dict_in_generate=True)
        cache = _cache_of(full)
        length = cache.get_seq_length()
        cache.crop(-2)  # undo two decoded tokens in every layer, deep ones included
        assert cache.get_seq_length() == length - 2
        assert [layer.keys.shape[-2] for layer in cache.layers][2] == cache.dpvr_text_valid.shape[1] + 2
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(-4)  # into the prompt: the deep layers hold its text only
        cache.batch_select_indices(torch.tensor([2, 0]))  # keep samples 2 and 0
        assert cache.dpvr_text_valid.shape[0] == 2
        seq = full.sequences[[2, 0], : ids.shape[1] + 3]
        more = torch.cat([mask[[2, 0]], torch.ones(2, 3, dtype=mask.dtype)], 1)
        again = model.generate(input_ids=seq, attention_mask=more, max_new_tokens=2, do_sample=False,
                               **{CACHE_KW: cache})
    assert torch.equal(again, full.sequences[[2, 0]])


# --- B3: a batch without a text token -------------------------------------------------------------------------


def test_batch_without_text_tokens_forward_loss_and_generate():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, mask, pv = make_batch([["I"], ["I", "I"]], seed=2)  # left-padded, image tokens only
    # a label counts where the token before it is real (the logits of pad positions are not part of the contract)
    predicted_from_real = mask.bool() & torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1).bool()
    labels = torch.where(predicted_from_real, ids, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels)
        ref = reference_forward(model, ids, pv, mask)
    assert rel_err(out.logits, ref, mask) < 1e-5
    shift_logits, shift_labels = ref[:, :-1].reshape(-1, ref.shape[-1]), labels[:, 1:].reshape(-1)
    assert abs(out.loss.item() - F.cross_entropy(shift_logits, shift_labels, ignore_index=-100).item()) < 1e-5
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, reference_loop(model, ids, mask, pv, 4)[0])


def test_batch_without_text_tokens_trains():
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2).train()
    ids, mask, pv = make_batch([["I"], ["I"]], seed=3)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=ids, use_cache=False)
    out.loss.backward()
    side = model.model.language_model.dpvr_side_branch
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.self_attn.parameters())


# --- B4: padding-free packed rows ------------------------------------------------------------------------------


def _packed(layouts, seed=0):
    """Sequences packed into one row: ids [1, sum L], position ids restarting at 0, per-sequence inputs."""
    apart = [make_batch([layout], seed=seed + i) for i, layout in enumerate(layouts)]
    ids = torch.cat([a[0] for a in apart], 1)
    pos = torch.cat([torch.arange(a[0].shape[1]) for a in apart])[None]
    pvs = [a[2] for a in apart if a[2] is not None]
    pv = torch.cat(pvs) if pvs else None
    return ids, pos, pv, apart


@pytest.mark.parametrize("layouts", [
    [["T"] * 6, ["T"] * 9],  # the repro: text only
    [["T", "I", "T"], ["T", "T", "I", "T", "T"], ["I", "T"]],  # image-bearing sequences
    [["T", "T"], ["I"], ["T", "I", "T", "I"]],  # an image-only sequence between others
])
def test_packed_rows_equal_sequences_apart(layouts):
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, pos, pv, apart = _packed(layouts)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, pixel_values=pv, use_cache=False).logits
        alone = torch.cat([model(input_ids=a, pixel_values=p, use_cache=False).logits for a, _, p in apart], 1)
        ref = reference_forward(model, ids, pv, position_ids=pos)
        # flash-attn style kwargs (DataCollatorWithFlattening) name the same sequences
        cu = torch.tensor([0] + [a[0].shape[1] for a in apart]).cumsum(0).to(torch.int32)
        by_cu = model(input_ids=ids, position_ids=pos, pixel_values=pv, use_cache=False, cu_seq_lens_q=cu,
                      cu_seq_lens_k=cu, max_length_q=int(cu.diff().max()), max_length_k=int(cu.diff().max())).logits
    ones = torch.ones(ids.shape, dtype=torch.long)
    assert rel_err(packed, alone, ones) < 1e-5
    assert rel_err(packed, ref, ones) < 1e-5
    assert rel_err(by_cu, alone, ones) < 1e-5


def test_packed_rows_with_a_cache_follow_stock():
    # With a cache stock does not separate packed sequences (its masks only do without one); neither does
    # DPVR-LF: the row is one sample, as in the reference without packing.
    model = dpvr_kernels.patch(tiny_llava(), route_layer=2)
    ids, pos, pv, _ = _packed([["T", "I", "T"], ["T", "T", "T"]])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, pixel_values=pv, use_cache=True).logits
        ref = reference_forward(model, ids, pv, position_ids=pos, packed=False)
        cu = torch.tensor([0, 6, 9], dtype=torch.int32)
        with pytest.raises(ValueError, match="use_cache=False"):
            model(input_ids=ids, position_ids=pos, pixel_values=pv, use_cache=True, cu_seq_lens_q=cu)
    assert rel_err(out, ref, torch.ones_like(ids)) < 1e-5


def test_packed_plan_segments_are_sequences():
    image = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    seq = packed_sequence_ids(pos)
    assert seq.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2], [0] * 9]
    plan = build_route_plan_from_mask(image, None, pos, seq)
    assert plan.text_seqlens == (2, 1, 3, 7) and plan.vision_seqlens == (2, 1, 0, 2)
    assert plan.text_cu_seqlens.tolist() == [0, 2, 3, 6, 13]
    assert plan.vision_cu_seqlens.tolist() == [0, 2, 3, 3, 5]
    unpacked = build_route_plan_from_mask(image, None, pos)
    assert torch.equal(plan.gather_index, unpacked.gather_index)  # same packing, only the segments differ
    assert torch.equal(plan.merge_index, unpacked.merge_index)
