"""Beyond one device: HF tensor parallelism, DDP (HF Trainer) and FSDP2 training on 2 CPU processes (gloo on
loopback, tests/dist_worker.py), accelerate device_map/offload placements, and the rank layouts the patch refuses.

Each multi-process test has a hard 60 s limit (tests/dist_util.py kills every rank on timeout) and compares with
a single-process run in this process (fp32, tolerance 1e-5).
"""

from __future__ import annotations

import types
from pathlib import Path

import dist_worker as w
import pytest
import torch
from dist_util import run_ranks
from tiny import IMAGE_TOKEN, make_batch, tiny_llava
from transformers import LlavaForConditionalGeneration

import dpvr_kernels
from dpvr_kernels.training import mark_trainable

TIMEOUT_S = 60
TOL = 1e-5

# Only the gloo backend is needed; a torch built without distributed support is the one reason to skip.
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaVA saved with save_pretrained: 6 layers, 4 query and 2 KV heads (divisible by 2 ranks)."""
    path = tmp_path_factory.mktemp("tiny_llava")
    model = tiny_llava(layers=6)
    assert model.config.text_config.num_attention_heads % 2 == 0 and model.config.text_config.num_key_value_heads % 2 == 0
    model.save_pretrained(path)
    return str(path)


def _max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------------------------- tensor parallel


def test_tensor_parallel_matches_single_process(model_dir, tmp_path):
    seconds = run_ranks("tp", tmp_path, model_dir, timeout=TIMEOUT_S)
    got = torch.load(tmp_path / "tp.pt")
    info = got["info"]
    # The side branch is sharded like layer r: half of the q_proj rows on each rank, its own storage.
    assert info["placements"] == "(Shard(dim=0),)" and info["local_shape"] == (32, 64)
    assert info["global_shape"] == (64, 64)
    assert info["local_equal_layer_r"] and not info["shares_storage"]

    single = w.load_patched(model_dir)
    want_logits, want_tokens = w.logits_and_tokens(single)
    err = float((got["logits"] - want_logits).abs().max())
    rel = err / float(want_logits.abs().max())
    print(f"TP x2 vs single process: max abs {err:.3g}, max rel {rel:.3g}, {seconds:.1f} s")
    assert err <= TOL, err
    assert torch.equal(got["tokens"], want_tokens)
    assert (want_tokens[:, -6:] != IMAGE_TOKEN).all()

    # save_pretrained of the patched TP model -> one process: the same (changed) side branch.
    trained = got["trained_side"]
    base_side = dict(single.model.language_model.dpvr_side_branch.named_parameters())
    assert all(torch.equal(trained[k], base_side[k].detach() * 1.5) for k in trained)
    reloaded = w.load_patched(str(tmp_path / "patched_tp_checkpoint"))
    one_side = {k: v.detach() for k, v in reloaded.model.language_model.dpvr_side_branch.named_parameters()}
    assert _max_abs(one_side, trained) == 0.0
    # ... and the TP reload read the saved side branch into its shards.
    assert _max_abs(got["reloaded_side"], trained) == 0.0
    one_logits, _ = w.logits_and_tokens(reloaded)
    assert float((got["reloaded_logits"] - one_logits).abs().max()) <= TOL
    assert float((one_logits - want_logits).abs().max()) > 1e-3  # the changed side branch is in use


def test_tensor_parallel_mrope_matches_single_process(tmp_path):
    """Qwen2.5-VL (M-RoPE rows gathered per token into both streams) under HF tensor parallelism on 2 ranks:
    the logits and greedy tokens of one process."""
    from qwen_models import tiny_qwen

    model_dir = tmp_path / "qwen2_5_vl"
    tiny_qwen("qwen2_5_vl", seed=21).save_pretrained(model_dir)
    run_ranks("tp_mrope", tmp_path, str(model_dir), timeout=TIMEOUT_S)
    got = torch.load(tmp_path / "tp_mrope.pt")
    assert got["placements"] == "(Shard(dim=0),)"  # the side branch is sharded like its layer
    want_logits, want_tokens = w.mrope_logits_and_tokens(w.load_mrope(str(model_dir)))
    assert float((got["logits"] - want_logits).abs().max()) <= TOL
    assert torch.equal(got["tokens"], want_tokens)


# ------------------------------------------------------------------------------------------------- training


def test_ddp_trainer_matches_single_process(model_dir, tmp_path):
    seconds = run_ranks("ddp", tmp_path, model_dir, timeout=TIMEOUT_S)
    got = torch.load(tmp_path / "ddp.pt")
    assert got["world"] == 2 and got["wrapper"] == "DistributedDataParallel"
    losses, side, wrapper = w.train_with_trainer(model_dir, tmp_path / "single", per_device_batch=len(w.TRAIN_LAYOUTS))
    start = {k: v.detach() for k, v in w.load_patched(model_dir).model.language_model.dpvr_side_branch.named_parameters()}
    loss_err = max(abs(a - b) for a, b in zip(got["losses"], losses, strict=True))
    weight_err = _max_abs(got["side"], side)
    print(f"DDP x2 vs single process: losses {got['losses']} vs {losses}, max loss diff {loss_err:.3g}, "
          f"max side-branch weight diff {weight_err:.3g}, {seconds:.1f} s")
    assert len(losses) == w.STEPS and wrapper != "DistributedDataParallel"
    assert loss_err <= TOL and weight_err <= TOL
    assert _max_abs(side, start) > 1e-4  # the side branch did train


def test_fsdp2_matches_single_process(model_dir, tmp_path):
    seconds = run_ranks("fsdp", tmp_path, model_dir, timeout=TIMEOUT_S)
    got = torch.load(tmp_path / "fsdp.pt")
    # patch() after fully_shard is refused, naming the order that works
    assert "dpvr_kernels.patch(model), then apply fully_shard" in got["refused"]
    samples = w.train_samples()
    num_tokens = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    model = w.load_patched(model_dir)
    mark_trainable(model)
    model.train()
    start = w.side_state(model)
    losses = w.train_loop(model, w.collate(samples), num_tokens, world=1)
    side = w.side_state(model)
    loss_err = max(abs(a - b) for a, b in zip(got["losses"], losses, strict=True))
    weight_err = _max_abs(got["side"], side)
    print(f"FSDP2 x2 vs single process: max loss diff {loss_err:.3g}, max side-branch weight diff {weight_err:.3g}, "
          f"{seconds:.1f} s")
    assert loss_err <= TOL and weight_err <= TOL
    assert _max_abs(side, start) > 1e-4


# --------------------------------------------------------------------------------------- device_map / offload


def _offload_map(offload: str) -> dict[str, str]:
    """Every decoder layer from the route layer (3) on alternates between CPU and ``offload``."""
    lm = "model.language_model"
    placement = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{lm}.embed_tokens": "cpu",
                 f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(6):
        placement[f"{lm}.layers.{i}"] = offload if i in (1, 3, 5) else "cpu"
    return placement


def _check_offloaded(model, single, tmp_path, save: bool) -> None:
    lm = model.model.language_model
    assert lm.layers[3].self_attn.q_proj.weight.device.type == "meta"  # layer r really is offloaded
    side = lm.dpvr_side_branch
    assert all(p.device.type == "cpu" for p in side.parameters())  # a real module: it trains and saves
    assert all(torch.equal(a, b) for a, b in zip(side.parameters(), single.model.language_model.dpvr_side_branch.parameters(),
                                                   strict=True))
    ids, mask, px = make_batch([["T", "I", "T", "T"], ["T", "T", "I"], ["I"]], seed=1)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": px}
    with torch.no_grad():
        got, want = model(**batch).logits, single(**batch).logits
    assert float((got - want).abs().max()) <= TOL
    gen = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert torch.equal(model.generate(**batch, **gen), single.generate(**batch, **gen))

    # training the side branch of the offloaded model moves it away from layer r, as on one device
    mark_trainable(model)
    labels = w.labels_for(ids, mask)
    loss = model(**batch, labels=labels, use_cache=False).loss
    loss.backward()
    assert all(p.grad is not None for p in side.parameters())
    with torch.no_grad():
        for p in side.parameters():
            p.add_(0.01)
    state = model.state_dict()
    assert all(torch.equal(state[f"model.language_model.dpvr_side_branch.{n}"], p) for n, p in side.named_parameters())
    if not save:  # stock save_pretrained cannot save a cpu_offload()-ed model (its weights are meta): nor can we
        return
    model.save_pretrained(tmp_path / "saved")
    reloaded = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval())
    for (name, a), b in zip(side.named_parameters(), reloaded.model.language_model.dpvr_side_branch.parameters(),
                            strict=True):
        assert torch.equal(a.detach(), b.detach()), name


@pytest.mark.parametrize("offload", ["disk", "cpu_offload"])
def test_device_map_offload_matches_single_device(model_dir, tmp_path, offload):
    single = w.load_patched(model_dir)
    if offload == "disk":
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, device_map=_offload_map("disk"),
                                                              offload_folder=str(tmp_path / "offload")).eval()
    else:
        from accelerate import cpu_offload

        model = cpu_offload(LlavaForConditionalGeneration.from_pretrained(model_dir).eval(), torch.device("cpu"))
    dpvr_kernels.patch(model)
    _check_offloaded(model, single, tmp_path, save=offload == "disk")


def test_device_map_saved_side_branch_is_loaded(model_dir, tmp_path):
    """A checkpoint with a trained side branch, loaded with layer r on disk: patch() reads the saved weights."""
    source = w.load_patched(model_dir)
    with torch.no_grad():
        for p in source.model.language_model.dpvr_side_branch.parameters():
            p.mul_(1.5)
    source.save_pretrained(tmp_path / "trained")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "trained", device_map=_offload_map("disk"),
                                                          offload_folder=str(tmp_path / "offload")).eval()
    dpvr_kernels.patch(model)
    for a, b in zip(model.model.language_model.dpvr_side_branch.parameters(),
                    source.model.language_model.dpvr_side_branch.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------------------------------- refusals


def _mesh(**sizes: int):
    """What HF's from_pretrained(distributed_config=...) puts on model._device_mesh, for the layout checks."""
    return types.SimpleNamespace(mesh_dim_names=tuple(sizes), shape=tuple(sizes.values()))


def test_pipeline_parallel_is_refused():
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    model = tiny_llava(layers=6)
    layers = model.model.language_model.layers
    for i in range(3, 6):  # what a pipeline stage holds: the other stage's layers are identities
        layers[i] = PipelineIdentityLayer()
    with pytest.raises(NotImplementedError, match="pipeline parallelism.*pp_size=1.*tp_plan='auto'"):
        dpvr_kernels.patch(model)
    model = tiny_llava(layers=6)
    model._device_mesh = _mesh(pp=2, fsdp=1, tp=1)
    with pytest.raises(NotImplementedError, match="pipeline parallelism"):
        dpvr_kernels.patch(model)
    assert not dpvr_kernels.is_patched(model)


@pytest.mark.parametrize("dim", ["cp", "sp"])
def test_context_and_sequence_parallel_meshes_are_refused(dim):
    model = tiny_llava(layers=6)
    model._device_mesh = _mesh(**{dim: 2, "tp": 1})
    with pytest.raises(NotImplementedError, match="context/sequence parallelism.*Several GPUs"):
        dpvr_kernels.patch(model)


def test_sequence_parallel_tp_rules_are_refused():
    model = tiny_llava(layers=6)
    model._tp_plan = {"model.language_model.layers.*.input_layernorm": "sequence_parallel"}
    with pytest.raises(NotImplementedError, match="sequence-parallel TP rules.*without sequence_parallel"):
        dpvr_kernels.patch(model)


def test_hf_fsdp_mesh_is_refused():
    model = tiny_llava(layers=6)
    model._device_mesh = _mesh(pp=1, fsdp=2, tp=1)
    with pytest.raises(NotImplementedError, match=r"patch\(model\), then apply fully_shard"):
        dpvr_kernels.patch(model)


# ----------------------------------------------------------------------------------------------- the example


def test_several_gpus_example(tmp_path):
    """examples/several_gpus.py as the README launches it (2 ranks): TP inference and FSDP2 training equal the
    single-process run of the same commands."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "several_gpus.py"
    spec = importlib.util.spec_from_file_location("several_gpus_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = str(tmp_path / "demo")
    example.make_model(model)

    t_infer = run_ranks("infer", tmp_path / "infer", model, timeout=TIMEOUT_S, script=path)
    printed = (tmp_path / "infer" / "rank0.log").read_text()
    assert "2 rank(s); new tokens:" in printed
    tokens = example.infer(model, max_new_tokens=8)
    prompt = tokens.shape[1] - 8
    assert str(tokens[:, prompt:]) in printed

    t_train = run_ranks("train", tmp_path / "train", model, "--fsdp", "--steps", "2", "--out", str(tmp_path / "fsdp"),
                        timeout=TIMEOUT_S, script=path)
    example.train(model, str(tmp_path / "single"), steps=2, global_batch=4, lr=1e-3, fsdp=False)
    sides = []
    for name in ("fsdp", "single", "demo"):
        patched = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(tmp_path / name))
        sides.append({k: v.detach() for k, v in patched.model.language_model.dpvr_side_branch.named_parameters()})
    err = _max_abs(sides[0], sides[1])
    print(f"example: TP infer {t_infer:.1f} s, FSDP2 train {t_train:.1f} s, side-branch weight diff {err:.3g}")
    assert err <= TOL and _max_abs(sides[1], sides[2]) > 1e-4
