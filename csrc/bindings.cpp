// Torch binding of the dpvr_kernels._C row-gather/scatter kernels.
//
// Registers two raw ops in the `dpvr_C` namespace (called as torch.ops.dpvr_C.<name>):
//   route_split(Tensor hidden, Tensor gather_index) -> Tensor
//   fuse_merge(Tensor text, Tensor image, Tensor? base, Tensor merge_index, int B, int L) -> Tensor
// with CPU, Meta and CUDA kernels. The CUDA kernels (route_cuda.cu, compiled by nvcc alone) are called only
// when this file is compiled with -DDPVR_WITH_CUDA; otherwise CUDA tensors raise a clear error. This file
// only validates arguments, allocates outputs and forwards raw pointers and byte strides; autograd and
// fake-tensor support live in the Python package, which wraps these ops.
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef DPVR_WITH_CUDA
// c10's stream/guard headers give the current stream (what ATen/cuda/CUDAContext.h re-exports) without
// pulling in the cuBLAS/cuSPARSE headers, so the binding builds against a minimal CUDA toolkit too.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "route_cuda.h"
#endif

namespace dpvr {
namespace cpu {
// Defined in route_cpu.cpp.
void route_split(const char* hidden, int64_t stride_b_bytes, int64_t stride_l_bytes, int64_t B, int64_t L,
                 const int64_t* gather_index, int64_t n_rows, int64_t row_bytes, char* out);
void fuse_merge(const char* text, int64_t text_stride_bytes, const char* image, int64_t image_stride_bytes,
                const char* base, int64_t base_stride_b_bytes, int64_t base_stride_l_bytes,
                const int64_t* merge_index, int64_t T, int64_t V, int64_t B, int64_t L, int64_t row_bytes,
                char* out);
}  // namespace cpu

namespace {

// A size-1 (or empty) last dim has no meaningful stride; otherwise rows must be dense.
bool last_dim_dense(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

void check_index(const char* op, const char* name, const at::Tensor& index, const at::Tensor& ref) {
  TORCH_CHECK(index.dim() == 1, op, ": ", name, " must be 1-D, got a ", index.dim(),
              "-D tensor of shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must be int64 (torch.long), got ",
              index.scalar_type());
  TORCH_CHECK(index.device() == ref.device(), op, ": ", name, " must be on the same device as the data (",
              ref.device(), "), got ", index.device());
}

void check_route_split(const at::Tensor& hidden, const at::Tensor& gather_index) {
  constexpr const char* op = "dpvr_C::route_split";
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be 3-D [B, L, D], got a ", hidden.dim(),
              "-D tensor of shape ", hidden.sizes());
  TORCH_CHECK(last_dim_dense(hidden), op, ": hidden must have stride(-1) == 1 (dense rows), got strides ",
              hidden.strides());
  check_index(op, "gather_index", gather_index, hidden);
  TORCH_CHECK(gather_index.numel() == 0 || hidden.size(0) * hidden.size(1) > 0, op,
              ": gather_index has ", gather_index.numel(), " entries but hidden of shape ", hidden.sizes(),
              " has no rows to gather from");
}

void check_fuse_merge(const at::Tensor& text, const at::Tensor& image, const std::optional<at::Tensor>& base,
                      const at::Tensor& merge_index, int64_t B, int64_t L) {
  constexpr const char* op = "dpvr_C::fuse_merge";
  TORCH_CHECK(B >= 0 && L >= 0, op, ": B and L must be non-negative, got B = ", B, ", L = ", L);
  TORCH_CHECK(L == 0 || B <= std::numeric_limits<int64_t>::max() / L, op, ": B * L overflows int64");
  TORCH_CHECK(text.dim() == 2, op, ": text must be 2-D [T, D], got a ", text.dim(), "-D tensor of shape ",
              text.sizes());
  TORCH_CHECK(image.dim() == 2, op, ": image must be 2-D [V, D], got a ", image.dim(),
              "-D tensor of shape ", image.sizes());
  TORCH_CHECK(text.size(1) == image.size(1), op, ": text and image must have the same hidden size D, got ",
              text.sizes(), " and ", image.sizes());
  TORCH_CHECK(text.scalar_type() == image.scalar_type(), op, ": text and image must have the same dtype, got ",
              text.scalar_type(), " and ", image.scalar_type());
  TORCH_CHECK(text.device() == image.device(), op, ": text and image must be on the same device, got ",
              text.device(), " and ", image.device());
  TORCH_CHECK(last_dim_dense(text), op, ": text must have stride(-1) == 1 (dense rows), got strides ",
              text.strides());
  TORCH_CHECK(last_dim_dense(image), op, ": image must have stride(-1) == 1 (dense rows), got strides ",
              image.strides());
  const int64_t D = text.size(1);
  if (base.has_value()) {
    const at::Tensor& b = *base;
    TORCH_CHECK(b.dim() == 3, op, ": base must be 3-D [B, L, D], got a ", b.dim(), "-D tensor of shape ",
                b.sizes());
    TORCH_CHECK(b.size(0) == B && b.size(1) == L && b.size(2) == D, op, ": base must have shape [B, L, D] = [",
                B, ", ", L, ", ", D, "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == text.scalar_type(), op, ": base must have the dtype of text (",
                text.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == text.device(), op, ": base must be on the same device as text (", text.device(),
                "), got ", b.device());
    TORCH_CHECK(last_dim_dense(b), op, ": base must have stride(-1) == 1 (dense rows), got strides ",
                b.strides());
  }
  check_index(op, "merge_index", merge_index, text);
  TORCH_CHECK(merge_index.numel() == B * L, op, ": merge_index must have B * L = ", B * L,
              " entries, got ", merge_index.numel());
}

int64_t row_stride_bytes(const at::Tensor& t, int64_t dim) { return t.stride(dim) * t.element_size(); }

// ---------------------------------------------------------------- CPU

// A fresh multi-MB output is a new mmap that the first write faults in 4 KiB page by page; on a
// machine with transparent huge pages in "madvise" mode, asking for huge pages takes ~40x fewer
// faults (measured: 20k -> 0.5k per 84 MB). Only this buffer's pages are affected; where it is not
// supported this is a no-op.
at::Tensor empty_for_copy(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  unsigned char resident = 1;
  // Only a fresh mapping (its first page not yet resident) gains: heap memory that malloc hands out
  // again is already faulted in, and re-advising it only splits and re-faults its pages.
  if (last > first && mincore(reinterpret_cast<void*>(first), 1, &resident) == 0 && !(resident & 1)) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advisory: errors are ignored
  }
#endif
  return out;
}

at::Tensor route_split_cpu(const at::Tensor& hidden, const at::Tensor& gather_index) {
  check_route_split(hidden, gather_index);
  const at::Tensor index = gather_index.contiguous();
  const int64_t N = index.numel();
  const int64_t D = hidden.size(2);
  at::Tensor out = empty_for_copy({N, D}, hidden.options());
  cpu::route_split(static_cast<const char*>(hidden.const_data_ptr()), row_stride_bytes(hidden, 0),
                   row_stride_bytes(hidden, 1), hidden.size(0), hidden.size(1), index.const_data_ptr<int64_t>(),
                   N, D * hidden.element_size(), static_cast<char*>(out.data_ptr()));
  return out;
}

at::Tensor fuse_merge_cpu(const at::Tensor& text, const at::Tensor& image, const std::optional<at::Tensor>& base,
                          const at::Tensor& merge_index, int64_t B, int64_t L) {
  check_fuse_merge(text, image, base, merge_index, B, L);
  const at::Tensor index = merge_index.contiguous();
  const int64_t D = text.size(1);
  at::Tensor out = empty_for_copy({B, L, D}, text.options());
  const char* base_ptr = base.has_value() ? static_cast<const char*>(base->const_data_ptr()) : nullptr;
  cpu::fuse_merge(static_cast<const char*>(text.const_data_ptr()), row_stride_bytes(text, 0),
                  static_cast<const char*>(image.const_data_ptr()), row_stride_bytes(image, 0), base_ptr,
                  base.has_value() ? row_stride_bytes(*base, 0) : 0,
                  base.has_value() ? row_stride_bytes(*base, 1) : 0, index.const_data_ptr<int64_t>(),
                  text.size(0), image.size(0), B, L, D * text.element_size(),
                  static_cast<char*>(out.data_ptr()));
  return out;
}

// ---------------------------------------------------------------- Meta (shapes only)

at::Tensor route_split_meta(const at::Tensor& hidden, const at::Tensor& gather_index) {
  check_route_split(hidden, gather_index);
  return at::empty({gather_index.size(0), hidden.size(2)}, hidden.options());
}

at::Tensor fuse_merge_meta(const at::Tensor& text, const at::Tensor& image,
                           const std::optional<at::Tensor>& base, const at::Tensor& merge_index, int64_t B,
                           int64_t L) {
  check_fuse_merge(text, image, base, merge_index, B, L);
  return at::empty({B, L, text.size(1)}, text.options());
}

// ---------------------------------------------------------------- CUDA

#ifdef DPVR_WITH_CUDA

at::Tensor route_split_cuda(const at::Tensor& hidden, const at::Tensor& gather_index) {
  check_route_split(hidden, gather_index);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor index = gather_index.contiguous();
  const int64_t N = index.numel();
  const int64_t D = hidden.size(2);
  at::Tensor out = at::empty({N, D}, hidden.options());
  const cudaError_t err = dpvr_route_split_cuda(
      hidden.const_data_ptr(), row_stride_bytes(hidden, 0), row_stride_bytes(hidden, 1), hidden.size(0),
      hidden.size(1), index.const_data_ptr<int64_t>(), N, D * hidden.element_size(), out.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "dpvr_C::route_split: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor fuse_merge_cuda(const at::Tensor& text, const at::Tensor& image,
                           const std::optional<at::Tensor>& base, const at::Tensor& merge_index, int64_t B,
                           int64_t L) {
  check_fuse_merge(text, image, base, merge_index, B, L);
  const c10::cuda::CUDAGuard guard(text.device());
  const at::Tensor index = merge_index.contiguous();
  const int64_t D = text.size(1);
  at::Tensor out = at::empty({B, L, D}, text.options());
  const cudaError_t err = dpvr_fuse_merge_cuda(
      text.const_data_ptr(), row_stride_bytes(text, 0), image.const_data_ptr(), row_stride_bytes(image, 0),
      base.has_value() ? base->const_data_ptr() : nullptr, base.has_value() ? row_stride_bytes(*base, 0) : 0,
      base.has_value() ? row_stride_bytes(*base, 1) : 0, index.const_data_ptr<int64_t>(), text.size(0),
      image.size(0), B, L, D * text.element_size(), out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "dpvr_C::fuse_merge: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

#else

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "dpvr_C::", op,
              ": got CUDA tensors, but dpvr_kernels._C was built without CUDA support (CPU-only torch, no "
              "nvcc/CUDA_HOME, or DPVR_NO_CUDA=1). Rebuild with a CUDA build of torch and nvcc available: "
              "pip install -e . --no-build-isolation");
}

at::Tensor route_split_cuda(const at::Tensor&, const at::Tensor&) { no_cuda("route_split"); }

at::Tensor fuse_merge_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, int64_t, int64_t) {
  no_cuda("fuse_merge");
}

#endif  // DPVR_WITH_CUDA

}  // namespace
}  // namespace dpvr

TORCH_LIBRARY(dpvr_C, m) {
  m.def("route_split(Tensor hidden, Tensor gather_index) -> Tensor");
  m.def("fuse_merge(Tensor text, Tensor image, Tensor? base, Tensor merge_index, int B, int L) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpvr_C, CPU, m) {
  m.impl("route_split", &dpvr::route_split_cpu);
  m.impl("fuse_merge", &dpvr::fuse_merge_cpu);
}

TORCH_LIBRARY_IMPL(dpvr_C, Meta, m) {
  m.impl("route_split", &dpvr::route_split_meta);
  m.impl("fuse_merge", &dpvr::fuse_merge_meta);
}

TORCH_LIBRARY_IMPL(dpvr_C, CUDA, m) {
  m.impl("route_split", &dpvr::route_split_cuda);
  m.impl("fuse_merge", &dpvr::fuse_merge_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpvr_kernels compiled kernels: raw ops torch.ops.dpvr_C.route_split / fuse_merge";
  m.def(
      "has_cuda",
      []() {
#ifdef DPVR_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the extension was built with its CUDA kernels.");
}
