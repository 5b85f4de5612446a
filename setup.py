"""Build script for the optional compiled extension ``dpvr_kernels._C``.

Package metadata lives in pyproject.toml; this file only adds ``ext_modules`` and ``cmdclass``.
Install with (torch must already be installed)::

    pip install -e . --no-build-isolation

What gets built:

* always (unless ``DPVR_NO_EXTENSION=1``): the C++ CPU kernels (csrc/route_cpu.cpp + csrc/bindings.cpp),
  compiled with -O3 and the OpenMP flags torch's ``at::parallel_for`` needs;
* additionally, the CUDA kernels (csrc/route_cuda.cu, compiled by nvcc) when torch is a CUDA build
  (``torch.version.cuda`` is set) and nvcc is found (``CUDA_HOME``), unless ``DPVR_NO_CUDA=1``.

``DPVR_NO_EXTENSION=1`` installs the pure-Python package: the ops then fall back to torch / Triton.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags so at::parallel_for runs in parallel, matching torch's own backend."""
    import torch

    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" not in info:
        return [], []  # native thread-pool backend: no OpenMP flags needed
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _extensions() -> tuple[list, dict]:
    if _env_flag("DPVR_NO_EXTENSION"):
        print("dpvr_kernels: DPVR_NO_EXTENSION=1, installing without the compiled extension")
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    omp_compile, omp_link = _openmp_flags()
    link_flags = list(omp_link)
    if sys.platform.startswith("linux"):
        # Link the shared libstdc++ that libtorch itself uses, by soname. A toolchain whose own lib dir only
        # has libstdc++.a (seen: a wrapped GCC in $CXX on a GPU image) otherwise puts a private static copy
        # into the extension, which segfaults the first time it formats a TORCH_CHECK message. With a
        # standard g++ this is redundant and harmless.
        link_flags.append("-l:libstdc++.so.6")
    # No -std flag: BuildExtension adds the C++ standard this torch's headers need (C++17 or C++20).
    cxx_flags = (["/O2"] if sys.platform == "win32" else ["-O3"]) + omp_compile
    sources = [f"{CSRC}/route_cpu.cpp", f"{CSRC}/bindings.cpp"]

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _env_flag("DPVR_NO_CUDA")
    if with_cuda:
        print(f"dpvr_kernels: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME})")
        ext = CUDAExtension(
            name="dpvr_kernels._C",
            sources=[*sources, f"{CSRC}/route_cuda.cu"],
            include_dirs=[str(ROOT / CSRC)],
            define_macros=[("DPVR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        reason = (
            "DPVR_NO_CUDA=1"
            if _env_flag("DPVR_NO_CUDA")
            else "torch is a CPU build"
            if torch.version.cuda is None
            else "nvcc / CUDA_HOME not found"
        )
        print(f"dpvr_kernels: building CPU kernels only ({reason})")
        ext = CppExtension(
            name="dpvr_kernels._C",
            sources=sources,
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
