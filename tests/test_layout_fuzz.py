"""Model-level layout fuzzer: random batches against the reference forward and the reference generate loop.

Random batch size, padding side, 0-3 images per sample (image-only and text-only samples included), padding-
free packed rows, route layer 0..N-2 and 1-2 fusion layers. Derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_generation import reference_loop
from tiny import make_batch, rel_err, tiny_llava

import dpvr_kernels
from dpvr_kernels.reference import reference_forward

LAYERS = 4
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@st.composite
def sample_layout(draw) -> list[str]:
    """One sample: 0-3 images ('I', 4 tokens each) among 0-6 text tokens ('T'), never empty."""
    images = draw(st.integers(0, 3))
    text = draw(st.integers(0 if images else 1, 6))
    items = ["I"] * images + ["T"] * text
    return list(draw(st.permutations(items)))


@st.composite
def route_settings(draw) -> tuple[int, int]:
    fusion = draw(st.integers(1, 2))
    return draw(st.integers(0, LAYERS - fusion - 1)), fusion


def patched_model(route: tuple[int, int], seed: int):
    model = tiny_llava(layers=LAYERS, seed=seed)
    model.generation_config.suppress_tokens = None  # a generated image-token id is text: let it happen
    model.generation_config.eos_token_id = None  # the reference loop does not stop at EOS
    return dpvr_kernels.patch(model, route_layer=route[0], fusion_layers=route[1])


@settings(FUZZ, max_examples=200)
@given(layouts=st.lists(sample_layout(), min_size=1, max_size=4), left_pad=st.booleans(), route=route_settings(),
       seed=st.integers(0, 2**16))
def test_fuzz_batches_match_reference(layouts, left_pad, route, seed):
    model = patched_model(route, seed % 7)
    ids, mask, pv = make_batch(layouts, seed=seed, left_pad=left_pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=pos).logits
        ref = reference_forward(model, ids, pv, mask, position_ids=pos)
    assert rel_err(out, ref, mask) < 1e-5


@settings(FUZZ, max_examples=150)
@given(sequences=st.lists(sample_layout(), min_size=2, max_size=4), route=route_settings(), seed=st.integers(0, 2**16))
def test_fuzz_packed_rows_match_reference(sequences, route, seed):
    model = patched_model(route, seed % 7)
    parts = [make_batch([layout], seed=seed + i) for i, layout in enumerate(sequences)]
    ids = torch.cat([p[0] for p in parts], 1)
    pos = torch.cat([torch.arange(p[0].shape[1]) for p in parts])[None]
    pvs = [p[2] for p in parts if p[2] is not None]
    pv = torch.cat(pvs) if pvs else None
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, pixel_values=pv, use_cache=False).logits
        ref = reference_forward(model, ids, pv, position_ids=pos)
    assert rel_err(out, ref, torch.ones_like(ids)) < 1e-5


@settings(FUZZ, max_examples=80)
@given(layouts=st.lists(sample_layout(), min_size=1, max_size=3), route=route_settings(), seed=st.integers(0, 2**16))
def test_fuzz_greedy_generate_matches_reference_loop(layouts, route, seed):
    # Left padding only: with right padding the first new token is read off a pad position, whose logits
    # are not part of the contract (transformers warns against it too).
    model = patched_model(route, seed % 7)
    ids, mask, pv = make_batch(layouts, seed=seed, left_pad=True)
    images = {} if pv is None else {"pixel_values": pv}  # generate encodes pixel_values=None as an image
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **images)
    ref, _ = reference_loop(model, ids, mask, pv, 3, suppress=())
    assert torch.equal(out, ref)
