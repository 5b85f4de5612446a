#!/usr/bin/env bash
# GPU validation kit: build the CUDA extension, run the CUDA-marked tests, run the GPU benchmarks at
# LLaVA-1.5-7B shapes, and write a markdown report + JSON into benchmarks/results/. Meant for one short
# run (< 8 min) on a lent H100 that has torch with CUDA, Triton and transformers already installed.
#
#   bash scripts/gpu_check.sh            # PYTHON=... to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=benchmarks/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing to do."
    echo "gpu_check: run this on a machine with an NVIDIA GPU and a CUDA build of torch."
    exit 3
fi
mkdir -p "$OUT"
REPORT="$OUT/gpu_report.md"
log() { echo "[gpu_check $(date -u +%T)] $*"; }

log "versions"
"$PY" - <<'PYEOF' | tee "$OUT/gpu_env.txt"
import torch, transformers, platform
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
try:
    import flash_attn; fv = flash_attn.__version__
except ImportError:
    fv = "not installed"
print(f"gpu: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
print(f"torch {torch.__version__} cuda {torch.version.cuda}; triton {tv}; transformers {transformers.__version__}; flash-attn {fv}; python {platform.python_version()}")
PYEOF

log "build the extension (CPU + CUDA kernels)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/gpu_build.log" 2>&1 \
    || "$PY" setup.py build_ext --inplace >>"$OUT/gpu_build.log" 2>&1 \
    || { log "extension build FAILED (see $OUT/gpu_build.log); continuing with Triton/torch"; tail -20 "$OUT/gpu_build.log"; }
"$PY" -c "from dpvr_kernels.ops import _extension as e; print('extension:', e.available(), 'cuda kernels:', e.has_cuda(), e.unavailable_reason() or '')"

log "CUDA tests"
timeout 180 "$PY" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider -rA 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"

log "GPU benchmarks (LLaVA-1.5-7B shapes, bf16)"
DPVR_BENCH_OUT="$OUT/gpu_bench.md" timeout 300 "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/gpu_bench.json" 2>&1 | tail -80 > "$OUT/gpu_bench_log.txt"

{
    echo "# GPU check ($STAMP)"
    echo
    echo '```'; cat "$OUT/gpu_env.txt"; echo '```'
    echo
    echo "## CUDA tests"
    echo '```'; tail -25 "$OUT/gpu_tests.txt"; echo '```'
    echo
    echo "## Benchmarks (medians; ratios against the stock / torch baseline of the same run)"
    cat "$OUT/gpu_bench.md" 2>/dev/null || { echo '```'; tail -40 "$OUT/gpu_bench_log.txt"; echo '```'; }
} > "$REPORT"
log "report written to $REPORT"
echo
cat "$OUT/gpu_bench.md" 2>/dev/null | tail -30
grep -E "passed|failed" "$OUT/gpu_tests.txt" | tail -1
