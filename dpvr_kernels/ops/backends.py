"""Which implementation of the route kernels runs: resolution of ``backend=`` and availability checks.

Backends differ only in the kernel; semantics, validation and autograd live in one place per op.

- ``"triton"``: Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``, for tests).
- ``"cuda"``: the compiled extension's CUDA kernel (``dpvr_kernels._C`` built where CUDA is).
- ``"cpu"``: the compiled extension's C++ kernel (parallel loop).
- ``"torch"``: plain torch indexing, the reference; always available.
- ``"auto"``: on CUDA the extension's CUDA kernel, else Triton; on CPU the extension, else torch.
  On an H200 the extension's kernels ran at 81-94% of a device copy (benchmarks/results/gpu_notes.md);
  Triton has not been timed on a GPU yet, so the measured kernel is the default.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _extension

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA, or anywhere under the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def extension_available(device: torch.device) -> bool:
    ext = _extension.load(warn=False)
    if ext is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _extension.has_cuda())


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user-facing backend name to the kernel that runs: ``"triton"``, ``"ext"`` or ``"torch"``."""
    check_backend_name(backend)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available(device):
            raise RuntimeError(
                f"backend='triton' needs a CUDA device (tensors are on {device}) and `pip install triton`; "
                "on CPU it only runs under TRITON_INTERPRET=1 (for tests). Use backend='auto' or 'cpu'."
            )
        return "triton"
    if backend in ("cuda", "cpu"):
        if device.type != backend:
            raise RuntimeError(f"backend={backend!r} but the tensors are on {device}; use backend='auto'")
        if not extension_available(device):
            what = "with CUDA (torch with CUDA and nvcc on the build machine)" if backend == "cuda" else ""
            raise RuntimeError(
                f"backend={backend!r} needs the compiled extension dpvr_kernels._C {what}, which is not available; "
                "build it with `pip install -e . --no-build-isolation`, or use backend='auto'"
            )
        return "ext"
    # auto
    if extension_available(device):
        return "ext"
    if device.type == "cuda" and triton_available(device):
        return "triton"
    if _extension.load(warn=True) is not None and device.type in ("cpu", "cuda"):
        # the extension loaded but has no kernel for this device (e.g. built without CUDA)
        _warn_once(f"fallback-{device.type}", f"dpvr_kernels: no compiled kernel for {device.type}; using torch indexing")
    return "torch"
