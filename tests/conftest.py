import os

# Tests never download: models and processors come from folders the tests make (HF_HUB_OFFLINE is read when
# huggingface_hub is imported, so it is set before anything imports transformers).
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

# The vLLM plugin's tests run in their own environment (make vllm-test sets DPVR_VLLM_TESTS), not in make test.
collect_ignore = [] if os.environ.get("DPVR_VLLM_TESTS") else ["vllm_plugin"]
# The processor tests need torchvision (make processors-test sets DPVR_PROCESSOR_TESTS in .venv-processors).
if not os.environ.get("DPVR_PROCESSOR_TESTS"):
    collect_ignore.append("processors")

# Triton kernels run on CPU only under the interpreter; it must be set before triton.jit decorates them.
if not torch.cuda.is_available() and not os.environ.get("DPVR_VLLM_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models are overhead-bound: one thread is faster and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
