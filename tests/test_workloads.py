"""Synthetic workloads: greedy decoding never feeds the image token back; padding layout."""

import torch
from tiny import IMAGE_TOKEN, tiny_config

import dpvr_kernels
from dpvr_kernels.workloads import build_model, decode, greedy, prefill, synthetic_batch


def test_greedy_honours_suppress_tokens():
    model = build_model(tiny_config(layers=4))
    logits = torch.randn(3, model.config.text_config.vocab_size)
    logits[:, IMAGE_TOKEN] = 100.0  # the image token would win the argmax
    tokens = greedy(model, logits)
    assert (tokens != IMAGE_TOKEN).all()
    assert torch.equal(tokens[:, 0], logits.clone().index_fill_(1, torch.tensor([IMAGE_TOKEN]), -1e9).argmax(-1))


def test_decode_loop_runs_on_a_patched_model():
    model = dpvr_kernels.patch(build_model(tiny_config(layers=4)), route_layer=1)
    batch = synthetic_batch(model.config, 3, 8, images=1, pad=3)
    with torch.no_grad():
        first, cache = prefill(model, batch)
        tokens = decode(model, batch, first, cache, steps=6)
    assert tokens.shape == (3, 7) and (tokens != IMAGE_TOKEN).all()


def test_synthetic_batch_padding():
    cfg = tiny_config(layers=4)
    one = synthetic_batch(cfg, 1, 8, pad=3)
    assert int((one.attention_mask == 0).sum()) == 3  # a single sample is padded too
    many = synthetic_batch(cfg, 4, 8, pad=3)
    assert (many.attention_mask == 0).sum(-1).tolist() == [0, 1, 2, 3]
    assert ((many.input_ids == IMAGE_TOKEN).sum(-1) == 4).all()
