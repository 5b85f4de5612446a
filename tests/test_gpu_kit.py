"""The GPU validation kit's no-GPU path: it exits at once with a clear message (and a non-zero code)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the path taken without a GPU")
def test_gpu_check_without_gpu_exits_clearly():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3
    assert "no CUDA GPU" in proc.stdout
