"""What the end-to-end benchmarks run, per device (one place for the prefill and decode suites).

CUDA: LLaVA-1.5-7B shapes (576 image + 64 text tokens) with random bf16 weights. CPU: a LLaVA-1.5-shaped
model scaled down (hidden 1024, 16 layers, 144 image + 32 text tokens) in fp32. A smoke run on CPU
(``DPVR_BENCH_QUICK=1``, the GPU kit's dry run) uses the ``tiny`` preset: it checks the suites, not speed.
"""

import torch
from timing import QUICK

from dpvr_kernels.presets import named_config, scaled_config, size_config

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DTYPE]
CONFIG = named_config("llava-1.5-7b") if CUDA else size_config("tiny") if QUICK else scaled_config()
TEXT_TOKENS = 64 if CUDA else 32
PREFILL_BATCHES = [1, 8] if CUDA else [4]
DECODE_BATCHES = [1, 8, 32] if CUDA else [1, 16]
DECODE_STEPS = 32 if CUDA else 8
