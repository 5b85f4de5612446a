"""The side branch in saved folders: ``save_pretrained`` writes it with the model (the stock class has no such
module, so ``from_pretrained`` drops it), and :func:`load_saved_side_branch` reads it back at ``patch()``."""

from __future__ import annotations

import os

from torch import nn

from . import distributed
from .backbone import SIDE_BRANCH

__all__ = ["load_saved_side_branch", "saved_tensors"]


def saved_tensors(path: str):
    """``(key, open safetensors file)`` for every tensor that save_pretrained wrote into the folder ``path``."""
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    yield key, f


def load_saved_side_branch(model: nn.Module, side: nn.Module) -> bool:
    """After from_pretrained, read the side-branch weights that save_pretrained wrote (transformers drops
    them as unexpected keys, since the stock class has no side branch)."""
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not os.path.isdir(path):
        return False
    state = {}
    for key, f in saved_tensors(path):
        # transformers may rewrite the prefix on save (e.g. language_model.model.*): match the module
        _, sep, rest = key.partition(f"{SIDE_BRANCH}.")
        if sep:
            state[rest] = f.get_tensor(key)
    if not state:
        return False
    distributed.load_side_branch_state(side, state)
    return True
