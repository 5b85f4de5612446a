"""Random token layouts for tests: images anywhere, several or none, left/right padding, no-text samples."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

IMAGE_TOKEN = 7  # any id; text ids are drawn from the others


@st.composite
def sample_roles(draw, length: int, pad_side: str) -> list[str]:
    """Roles of one sample of ``length`` tokens: 'text', 'image' or 'pad'."""
    n_pad = draw(st.sampled_from([0, 0, 1, length // 3, length]))
    n_pad = min(n_pad, length)
    content = length - n_pad
    kind = draw(st.sampled_from(["mixed", "mixed", "mixed", "text_only", "image_only"]))
    roles: list[str] = []
    if kind == "text_only":
        roles = ["text"] * content
    elif kind == "image_only":
        roles = ["image"] * content
    else:
        while len(roles) < content:
            role = draw(st.sampled_from(["text", "image"]))
            run = draw(st.integers(1, max(1, content // 2)))
            roles += [role] * run
        roles = roles[:content]
    pads = ["pad"] * n_pad
    return pads + roles if pad_side == "left" else roles + pads


@st.composite
def batch_layouts(draw, max_b: int = 5, max_l: int = 300) -> list[list[str]]:
    bsz = draw(st.integers(1, max_b))
    length = draw(st.integers(1, max_l))
    side = draw(st.sampled_from(["left", "right"]))
    return [draw(sample_roles(length, side)) for _ in range(bsz)]


def layout_tensors(layout: list[list[str]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and generate-style position ids (cumsum of the mask) of a layout."""
    g = torch.Generator().manual_seed(seed)
    bsz, length = len(layout), len(layout[0])
    ids = torch.randint(8, 100, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.long)
    for b, roles in enumerate(layout):
        for pos, role in enumerate(roles):
            if role == "image":
                ids[b, pos] = IMAGE_TOKEN
            elif role == "pad":
                mask[b, pos] = 0
                # pad slots hold random ids, sometimes the image id: the mask must win
                if torch.rand((), generator=g) < 0.3:
                    ids[b, pos] = IMAGE_TOKEN
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
