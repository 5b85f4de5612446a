#!/usr/bin/env bash
# Compile csrc/route_cuda.cu with nvcc alone (no torch headers) for sm_80 and sm_90, to catch CUDA build
# errors on machines without a GPU. Exits non-zero when nvcc fails; exits 0 with a note when nvcc is absent.
#
# Usage: scripts/check_cuda_compile.sh        (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/csrc/route_cuda.cu"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check."
  exit 0
fi

OUT_DIR="$(mktemp -d /tmp/dpvr_cuda_check.XXXXXX)"
trap 'rm -rf "$OUT_DIR"' EXIT
OBJ="$OUT_DIR/route_cuda.o"

echo "check_cuda_compile: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda_compile: compiling $SRC for sm_80, sm_90"
"$NVCC" -std=c++17 -O3 -lineinfo -Xcompiler -Wall -Werror all-warnings \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 \
  -Xcompiler -fPIC -c "$SRC" -o "$OBJ"

# The extern "C" launchers the torch binding links against must be exported unmangled.
for sym in dpvr_route_split_cuda dpvr_fuse_merge_cuda; do
  if ! nm -g --defined-only "$OBJ" | grep -qw "$sym"; then
    echo "check_cuda_compile: FAILED: symbol $sym not defined in $OBJ" >&2
    exit 1
  fi
done
if command -v cuobjdump >/dev/null 2>&1 || [[ -x "$(dirname "$NVCC")/cuobjdump" ]]; then
  CUOBJDUMP="$(command -v cuobjdump || echo "$(dirname "$NVCC")/cuobjdump")"
  echo "check_cuda_compile: embedded cubins: $("$CUOBJDUMP" --list-elf "$OBJ" | sed 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/' | sort -u | tr '\n' ' ')"
fi
echo "check_cuda_compile: OK ($(stat -c %s "$OBJ") bytes)"
