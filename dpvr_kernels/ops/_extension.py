"""Loader for the optional compiled extension ``dpvr_kernels._C``.

The extension registers the raw kernels ``torch.ops.dpvr_C.route_split`` and ``torch.ops.dpvr_C.fuse_merge``
(C++ CPU kernels, plus CUDA kernels when it was built with CUDA). It is optional: a pure-Python install
(``DPVR_NO_EXTENSION=1``, or a failed build) falls back to the torch / Triton implementations, and the
first attempt to use the extension then warns once.
"""

from __future__ import annotations

import threading
import warnings
from types import ModuleType

__all__ = ["available", "has_cuda", "load", "unavailable_reason"]

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_reason: str | None = None
_warned = False


def _import() -> None:
    global _tried, _module, _reason
    with _lock:
        if _tried:
            return
        try:
            import torch  # noqa: F401  (loads libtorch / libc10, which _C links against)

            from dpvr_kernels import _C
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _module = None
            _reason = f"{type(exc).__name__}: {exc}"
        else:
            _module = _C
            _reason = None
        _tried = True


def load(warn: bool = True) -> ModuleType | None:
    """Import ``dpvr_kernels._C`` (once) and return it, or ``None`` when it is not available.

    Importing the module registers the ``torch.ops.dpvr_C`` ops. When the extension cannot be loaded and
    ``warn`` is true, a single ``RuntimeWarning`` (per process) explains why and how to rebuild it.
    """
    global _warned
    if not _tried:
        _import()
    if _module is None and warn and not _warned:
        _warned = True
        warnings.warn(
            f"dpvr_kernels: compiled extension not available ({_reason}); using the torch fallback. "
            "Rebuild with: pip install -e . --no-build-isolation",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def available() -> bool:
    """True when the compiled extension (at least its CPU kernels) can be used. Never warns."""
    return load(warn=False) is not None


def has_cuda() -> bool:
    """True when the compiled extension is available and was built with its CUDA kernels. Never warns."""
    module = load(warn=False)
    return module is not None and bool(module.has_cuda())


def unavailable_reason() -> str | None:
    """Why the extension could not be loaded (``None`` when it loaded, or has not been tried yet)."""
    return _reason
