"""dpvr_kernels.vllm.prepare_checkpoint: marks a saved DPVR-LF checkpoint for the vLLM plugin (no vLLM needed)."""

import json

import pytest
import torch
from model_folder import make_llava_folder, make_llava_next_folder
from transformers import LlavaForConditionalGeneration

import dpvr_kernels
from dpvr_kernels.vllm import ARCHITECTURE, prepare_checkpoint


def test_prepare_checkpoint_marks_a_saved_patched_model(tmp_path):
    stock = make_llava_folder(tmp_path / "stock")
    model = LlavaForConditionalGeneration.from_pretrained(stock, dtype=torch.float32)
    dpvr_kernels.patch(model, route_layer=1)
    with torch.no_grad():
        model.model.language_model.dpvr_side_branch.mlp.down_proj.weight.add_(0.5)
    model.save_pretrained(tmp_path / "dpvr")
    path = prepare_checkpoint(tmp_path / "dpvr")
    config = json.loads(open(path).read())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["dpvr"]["route_layer"] == 1
    # transformers still loads it, and patch() restores the trained side branch from it
    again = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(tmp_path / "dpvr", dtype=torch.float32))
    torch.testing.assert_close(again.model.language_model.dpvr_side_branch.mlp.down_proj.weight,
                               model.model.language_model.dpvr_side_branch.mlp.down_proj.weight, rtol=0, atol=0)


def test_prepare_checkpoint_refuses_what_the_plugin_cannot_serve(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_checkpoint(tmp_path)
    stock = make_llava_folder(tmp_path / "stock")
    with pytest.raises(ValueError, match="no 'dpvr' settings.*dpvr_kernels.patch"):
        prepare_checkpoint(stock)
    nxt = make_llava_next_folder(tmp_path / "next")  # a class the plugin serves, not yet patched
    with pytest.raises(ValueError, match="no 'dpvr' settings"):
        prepare_checkpoint(nxt)
    from transformers import Qwen2VLConfig

    Qwen2VLConfig().save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match="model_type is 'qwen2_vl'.*LLaVA-1.5, LLaVA-NeXT.*Qwen2.5-VL.*dpvr_kernels.patch"):
        prepare_checkpoint(tmp_path / "qwen")


def _saved_patched(tmp_path, name: str = "dpvr"):
    stock = make_llava_folder(tmp_path / "stock")
    model = dpvr_kernels.patch(LlavaForConditionalGeneration.from_pretrained(stock, dtype=torch.float32), route_layer=1)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_prepare_checkpoint_refuses_an_incomplete_side_branch(tmp_path):
    """vLLM does not report a linear layer's missing weights: a checkpoint whose side branch lost one tensor would
    be served with it uninitialised, so it is refused here (and again when vLLM loads it), naming the tensor."""
    from safetensors.torch import load_file, save_file

    folder = _saved_patched(tmp_path)
    path = folder / "model.safetensors"
    state = load_file(path)
    (gone,) = [k for k in state if k.endswith("dpvr_side_branch.mlp.down_proj.weight")]
    del state[gone]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no side-branch weights for \['mlp.down_proj.weight'\].*save_pretrained"):
        prepare_checkpoint(folder)


@pytest.mark.parametrize("dpvr, why", [({"route_layer": 3}, "route_layer=3 is out of range"),
                                       ({"fusion_layers": 1}, "route_layer")])
def test_prepare_checkpoint_refuses_invalid_settings(tmp_path, dpvr, why):
    folder = _saved_patched(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["dpvr"] = dpvr
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"not valid for its 4-layer decoder.*{why}.*re-save it with dpvr_kernels"):
        prepare_checkpoint(folder)
