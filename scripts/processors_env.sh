#!/usr/bin/env bash
# The environment of the processor tests (tests/processors, `make processors-test`): the project's own
# dependencies plus torchvision, which the Hugging Face processors of Qwen2-VL/2.5-VL/3-VL, GLM-4V, InternVL,
# SmolVLM, Mistral3 (Pixtral) and LLaVA-OneVision need (they cannot even be constructed without it). Kept out
# of .venv and `make test`: the only torchvision for torch 2.13.0 here is a CUDA build, patched to import
# (scripts/patch_torchvision.py). Idempotent.
#
#   bash scripts/processors_env.sh [VENV]     # default .venv-processors
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-processors}
PY="$VENV/bin/python"

test -x "$PY" || python3 -m venv "$VENV"
"$PY" -m pip install -q "setuptools>=64" wheel
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q --no-deps torchvision==0.28.0
"$PY" -m pip install -q ninja pybind11 num2words  # num2words: SmolVLM's processor
DPVR_NO_CUDA=1 "$PY" -m pip install -q -e ".[test]" --no-build-isolation
"$PY" scripts/patch_torchvision.py
"$PY" -c "import torchvision, transformers, dpvr_kernels; from transformers import Qwen2_5_VLProcessor; print(f'processors_env: torchvision {torchvision.__version__}, transformers {transformers.__version__}, dpvr_kernels OK')"
