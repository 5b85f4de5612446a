"""Make the CUDA build of torchvision 0.28.0 importable beside torch 2.13.0+cpu (the only torchvision that resolves
for that torch here): its _C.so needs libc10_cuda.so, which the CPU torch does not have. torchvision's __init__
is patched to skip the op registrations that need _C; the transforms (what the Hugging Face image and video
processors use) work without them. Idempotent.

    python scripts/patch_torchvision.py      # with the venv's python
"""

import importlib.util
import pathlib

MARKER = "# DPVR vllm_env.sh: no op registrations when torchvision's _C cannot load (a CUDA build on CPU torch)"
BLOCK = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"

init = pathlib.Path(importlib.util.find_spec("torchvision").origin)
text = init.read_text()
if MARKER not in text and "PHASE0 WORKAROUND" not in text:
    if BLOCK not in text:
        raise SystemExit(f"patch_torchvision: the op registrations are not where expected in {init}; patch by hand")
    text = text.replace(BLOCK, f"{MARKER}\nif extension._has_ops():\n    from torchvision import _autograd_registrations, "
                        "_meta_registrations  # noqa: F401\nfrom torchvision import (\n", 1)
    init.write_text(text)
print(f"patch_torchvision: torchvision patched ({init})")
