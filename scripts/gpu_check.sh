#!/usr/bin/env bash
# GPU validation kit: build the CUDA extension, run the CUDA-marked tests, check a cuda:0/cpu device_map
# split (scripts/device_map_check.py), run the benchmarks at
# LLaVA-1.5-7B shapes (bf16), try the vLLM plugin with CUDA graphs where vLLM's CUDA build is installed
# (scripts/vllm_cuda_check.py), and write a report (markdown + JSON) into benchmarks/results/. Meant for one
# short run (< 9 min in all: every stage has a time cap within one overall deadline) on a lent GPU that has
# torch with CUDA, Triton and transformers installed. Prints a short table last.
#
#   bash scripts/gpu_check.sh              # PYTHON=... chooses the interpreter, GPU_CHECK_OUT=... the folder
#   bash scripts/gpu_check.sh --dry-run    # no GPU needed: every stage on CPU, one-round benchmarks, report
#                                          # into a temporary folder (checks the kit itself; CI runs this)
#
# Exit code: 0 all stages passed (or, for the vLLM stage, found no vLLM to run), 1 a stage failed or ran out of
# time (the report says which), 3 no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then  # the first interpreter on PATH that has torch
    for candidate in python python3; do
        if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
            PY=$(command -v "$candidate"); break
        fi
    done
    PY=${PY:-python3}
fi
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
# The stages' caps are cut to what is left of this deadline; the report afterwards takes ~10-20 s more.
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-500}

if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing to do."
    echo "gpu_check: run this on a machine with an NVIDIA GPU and a CUDA build of torch (or pass --dry-run)."
    exit 3
fi
if [[ $DRY_RUN == 1 ]]; then
    OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
    export DPVR_BENCH_QUICK=1
    export CUDA_VISIBLE_DEVICES=""  # a CPU run even on a GPU machine
else
    OUT=${GPU_CHECK_OUT:-benchmarks/results}
fi
mkdir -p "$OUT"
STAGES="$OUT/gpu_stages.tsv"
# Outputs of an earlier run must not pass for this run's (a stage cut short writes fewer files).
rm -f "$OUT"/gpu_{stages.tsv,build.log,tests.txt,tests.xml,device_map.txt,bench.md,bench.json,bench_log.txt} \
    "$OUT"/gpu_{report.md,report.json,capacity.json,capacity_log.txt,bench_compiled.md,bench_compiled.json} \
    "$OUT"/gpu_bench_compiled_log.txt "$OUT"/gpu_vllm.{txt,json}
: > "$STAGES"
export PYTHONUNBUFFERED=1  # logs complete up to the moment a stage is stopped
log() { echo "[gpu_check $(date -u +%T)] $*"; }

# stage NAME CAP_S LOG COMMAND...: run COMMAND under min(CAP_S, time left) with its output in LOG; record its
# exit code and duration in $STAGES and show the last lines of LOG.
stage() {
    local name=$1 cap=$2 logfile=$3; shift 3
    local left=$((DEADLINE_S - SECONDS))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        log "$name: skipped, the ${DEADLINE_S}s deadline is reached"
        printf '%s\t%s\t%s\t%s\n' "$name" "deadline" 0 "$cap" >> "$STAGES"
        return
    fi
    log "$name (cap ${cap}s)"
    local t0=$SECONDS
    # SIGINT first: pytest then still writes its summary and JUnit XML; SIGKILL 20 s later if needed.
    timeout -s INT -k 20 "$cap" "$@" > "$logfile" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$cap" >> "$STAGES"
    ((rc == 124)) && log "$name: ran out of its ${cap}s"
    tail -3 "$logfile"
    return 0
}

if [[ $DRY_RUN == 1 ]]; then
    log "dry run: no GPU needed, the extension is not rebuilt, benchmarks run one round; report in $OUT"
    printf '%s\t%s\t%s\t%s\n' "build" "skipped" 0 0 >> "$STAGES"
else
    # In place (no packaging step): tests and benchmarks import dpvr_kernels from the repository root. The
    # report says whether the CUDA kernels loaded; the CUDA tests fail if they did not.
    stage build 120 "$OUT/gpu_build.log" "$PY" setup.py build_ext --inplace
fi

# Every CUDA-marked test of the suite (kernels on every backend and dtype, the model checks of test_cuda.py).
# A per-test limit where pytest-timeout is installed (it is on the lent GPU images), so one stuck test
# cannot take the stage; collection errors (e.g. a failed build) do not stop the other files' tests.
PER_TEST=()
"$PY" -c "import pytest_timeout" 2> /dev/null && PER_TEST=(--timeout=120)
stage tests 120 "$OUT/gpu_tests.txt" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -rfE --durations=8 \
    --continue-on-collection-errors -o junit_family=xunit1 --junitxml="$OUT/gpu_tests.xml" "${PER_TEST[@]}"

# ---- device_map check (issue 14) ------------------------------------------------------------------------------
# DPVR-LF with the decoder split between cuda:0 and cpu by an accelerate device_map (route, text stream, side branch
# and fusion cross devices) against the same model on cuda:0: logits and greedy generate. Tiny model, ~10 s.
# --dry-run: CPU + disk offload placements instead.
DM_ARGS=()
[[ $DRY_RUN == 1 ]] && DM_ARGS=(--dry-run)
stage device_map 60 "$OUT/gpu_device_map.txt" "$PY" scripts/device_map_check.py "${DM_ARGS[@]}"
# ---- end of the device_map check -------------------------------------------------------------------------------

# The benchmark tables are rewritten after every row, so a stage cut short keeps what it measured. Eager rows
# first (kernels, prefill B=1/8, decode B=1/8/32 with a dynamic and a static cache), then the compiled ones,
# whose compilation may take the rest of the time (their own files: a cut-short stage keeps the eager tables).
DPVR_BENCH_OUT="$OUT/gpu_bench.md" DPVR_BENCH_JSON="$OUT/gpu_bench.json" \
    stage benchmarks 170 "$OUT/gpu_bench_log.txt" "$PY" -m pytest benchmarks --benchmark-only -q \
    -p no:cacheprovider -rfE -k "not compiled"

# Largest batch for a 640-token prompt + 256 new tokens with a static cache, stock vs DPVR-LF (CUDA: until
# out of memory; the dry run only checks the plumbing with a small CPU budget).
CAPACITY_ARGS=()
[[ $DRY_RUN == 1 ]] && CAPACITY_ARGS=(--prompt-text 8 --new 2 --max-batch 2 --budget-gib 4)
stage capacity 100 "$OUT/gpu_capacity_log.txt" "$PY" scripts/capacity.py --out "$OUT/gpu_capacity.json" \
    "${CAPACITY_ARGS[@]}"

DPVR_BENCH_OUT="$OUT/gpu_bench_compiled.md" DPVR_BENCH_JSON="$OUT/gpu_bench_compiled.json" \
    stage benchmarks_compiled 150 "$OUT/gpu_bench_compiled_log.txt" "$PY" -m pytest benchmarks --benchmark-only \
    -q -p no:cacheprovider -rfE -k compiled

# ---- vLLM plugin on CUDA (issue 23) ----------------------------------------------------------------------------
# Piecewise CUDA graphs at vLLM's defaults, tokens equal to eager's, eager equal to HF DPVR-LF as often as stock's
# are to stock HF. Needs vLLM's CUDA build (VLLM_PYTHON chooses its interpreter); exit 4 where there is none.
VPY=${VLLM_PYTHON:-$PY}
if "$VPY" -c "import vllm" 2> /dev/null; then
    stage vllm_cuda 150 "$OUT/gpu_vllm.txt" "$VPY" scripts/vllm_cuda_check.py --out "$OUT/gpu_vllm.json"
else  # nothing to run: the script says why at once, whatever the deadline
    "$VPY" scripts/vllm_cuda_check.py --out "$OUT/gpu_vllm.json" > "$OUT/gpu_vllm.txt" 2>&1
    printf '%s\t%s\t%s\t%s\n' vllm_cuda $? 0 0 >> "$STAGES"
    log "vllm_cuda: $(tail -1 "$OUT/gpu_vllm.txt")"
fi

"$PY" scripts/gpu_report.py "$OUT" --dry-run=$DRY_RUN
