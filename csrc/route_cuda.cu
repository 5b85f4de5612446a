// CUDA row-gather/scatter kernels for dpvr_kernels._C.
//
// This file is compiled by nvcc on its own: it includes no torch headers, only the CUDA runtime. The torch
// binding (bindings.cpp, built with -DDPVR_WITH_CUDA) validates tensors and calls the extern "C" launchers
// declared in route_cuda.h with raw pointers, byte strides and the current stream.
//
// Both kernels are pure byte copies, so they are dtype-agnostic. Work is split into "row groups" of TPR
// threads (a power of two in [32, 256], i.e. one warp up to one 256-thread block per row); each block of
// 256 threads handles 256 / TPR rows at a time and walks the rows with a grid-stride loop, so any number of
// rows works with a bounded grid. Copies use the widest vector type (16, 8, 4, 2 or 1 bytes) that divides
// the row size, every base pointer and every row stride.
#include "route_cuda.h"

#include <cassert>
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kBlockThreads = 256;
constexpr int kMinRowThreads = 32;
constexpr int kMaxRowThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this

template <typename V>
__device__ __forceinline__ V zero_vec();
template <>
__device__ __forceinline__ uint4 zero_vec<uint4>() { return make_uint4(0u, 0u, 0u, 0u); }
template <>
__device__ __forceinline__ uint2 zero_vec<uint2>() { return make_uint2(0u, 0u); }
template <>
__device__ __forceinline__ unsigned int zero_vec<unsigned int>() { return 0u; }
template <>
__device__ __forceinline__ unsigned short zero_vec<unsigned short>() { return 0; }
template <>
__device__ __forceinline__ unsigned char zero_vec<unsigned char>() { return 0; }

template <typename V>
__device__ __forceinline__ void copy_row(V* __restrict__ dst, const V* __restrict__ src, int64_t nvec,
                                         int lane, int tpr) {
#pragma unroll 4
  for (int64_t v = lane; v < nvec; v += tpr) dst[v] = src[v];
}

template <typename V>
__device__ __forceinline__ void zero_row(V* __restrict__ dst, int64_t nvec, int lane, int tpr) {
  const V z = zero_vec<V>();
#pragma unroll 4
  for (int64_t v = lane; v < nvec; v += tpr) dst[v] = z;
}

template <typename V>
__global__ void __launch_bounds__(kBlockThreads)
route_split_kernel(const char* __restrict__ hidden, int64_t stride_b, int64_t stride_l, int64_t L,
                   int64_t n_src_rows, const int64_t* __restrict__ gather_index, int64_t n_rows,
                   int64_t nvec, int tpr_log2, V* __restrict__ out) {
  const int tpr = 1 << tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int64_t rows_per_block = blockDim.x >> tpr_log2;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> tpr_log2);
       row < n_rows; row += row_step) {
    const int64_t g = gather_index[row];
    assert(g >= 0 && g < n_src_rows);
    (void)n_src_rows;
    const int64_t b = g / L;
    const int64_t l = g - b * L;
    const V* src = reinterpret_cast<const V*>(hidden + b * stride_b + l * stride_l);
    copy_row(out + row * nvec, src, nvec, lane, tpr);
  }
}

template <typename V>
__global__ void __launch_bounds__(kBlockThreads)
fuse_merge_kernel(const char* __restrict__ text, int64_t text_stride, const char* __restrict__ image,
                  int64_t image_stride, const char* __restrict__ base, int64_t base_stride_b,
                  int64_t base_stride_l, const int64_t* __restrict__ merge_index, int64_t T,
                  int64_t n_src_rows, int64_t L, int64_t n_rows, int64_t nvec, int tpr_log2,
                  V* __restrict__ out) {
  const int tpr = 1 << tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int64_t rows_per_block = blockDim.x >> tpr_log2;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> tpr_log2);
       row < n_rows; row += row_step) {
    const int64_t k = merge_index[row];
    assert(k < n_src_rows);
    (void)n_src_rows;
    V* dst = out + row * nvec;
    if (k < 0) {
      if (base != nullptr) {
        const int64_t b = row / L;
        const int64_t l = row - b * L;
        copy_row(dst, reinterpret_cast<const V*>(base + b * base_stride_b + l * base_stride_l), nvec,
                 lane, tpr);
      } else {
        zero_row(dst, nvec, lane, tpr);
      }
    } else if (k < T) {
      copy_row(dst, reinterpret_cast<const V*>(text + k * text_stride), nvec, lane, tpr);
    } else {
      copy_row(dst, reinterpret_cast<const V*>(image + (k - T) * image_stride), nvec, lane, tpr);
    }
  }
}

// Widest power-of-two access size (<= 16) that divides every value OR-ed into `bits`.
inline int vector_bytes(uint64_t bits) {
  if (bits % 16 == 0) return 16;
  if (bits % 8 == 0) return 8;
  if (bits % 4 == 0) return 4;
  if (bits % 2 == 0) return 2;
  return 1;
}

struct LaunchShape {
  int tpr_log2;
  unsigned int blocks;
};

// Threads per row: enough that each thread moves about 4 vectors, clamped to [32, 256].
inline LaunchShape launch_shape(int64_t n_rows, int64_t nvec) {
  const int64_t want = (nvec + 3) / 4;
  int tpr_log2 = 5;  // 32
  while ((int64_t{1} << tpr_log2) < want && (1 << tpr_log2) < kMaxRowThreads) ++tpr_log2;
  const int64_t rows_per_block = kBlockThreads >> tpr_log2;
  int64_t blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  static_assert(kMinRowThreads == 32, "row groups are at least one warp");
  return LaunchShape{tpr_log2, static_cast<unsigned int>(blocks)};
}

template <typename V>
void launch_split(const void* hidden, int64_t sb, int64_t sl, int64_t L, int64_t n_src_rows,
                  const int64_t* idx, int64_t n_rows, int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
  const LaunchShape s = launch_shape(n_rows, nvec);
  route_split_kernel<V><<<s.blocks, kBlockThreads, 0, stream>>>(
      static_cast<const char*>(hidden), sb, sl, L, n_src_rows, idx, n_rows, nvec, s.tpr_log2,
      static_cast<V*>(out));
}

template <typename V>
void launch_merge(const void* text, int64_t ts, const void* image, int64_t is, const void* base,
                  int64_t bsb, int64_t bsl, const int64_t* idx, int64_t T, int64_t n_src_rows, int64_t L,
                  int64_t n_rows, int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
  const LaunchShape s = launch_shape(n_rows, nvec);
  fuse_merge_kernel<V><<<s.blocks, kBlockThreads, 0, stream>>>(
      static_cast<const char*>(text), ts, static_cast<const char*>(image), is,
      static_cast<const char*>(base), bsb, bsl, idx, T, n_src_rows, L, n_rows, nvec, s.tpr_log2,
      static_cast<V*>(out));
}

}  // namespace

extern "C" cudaError_t dpvr_route_split_cuda(const void* hidden, int64_t stride_b_bytes,
                                             int64_t stride_l_bytes, int64_t B, int64_t L,
                                             const int64_t* gather_index, int64_t n_rows,
                                             int64_t row_bytes, void* out, cudaStream_t stream) {
  if (n_rows <= 0 || row_bytes <= 0) return cudaSuccess;
  if (B <= 0 || L <= 0) return cudaErrorInvalidValue;  // every index would be out of range
  const int64_t n_src_rows = B * L;
  const uint64_t bits = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uintptr_t>(hidden) |
                        reinterpret_cast<uintptr_t>(out) | static_cast<uint64_t>(stride_b_bytes) |
                        static_cast<uint64_t>(stride_l_bytes);
  switch (vector_bytes(bits)) {
    case 16:
      launch_split<uint4>(hidden, stride_b_bytes, stride_l_bytes, L, n_src_rows, gather_index, n_rows,
                          row_bytes, out, stream);
      break;
    case 8:
      launch_split<uint2>(hidden, stride_b_bytes, stride_l_bytes, L, n_src_rows, gather_index, n_rows,
                          row_bytes, out, stream);
      break;
    case 4:
      launch_split<unsigned int>(hidden, stride_b_bytes, stride_l_bytes, L, n_src_rows, gather_index,
                                 n_rows, row_bytes, out, stream);
      break;
    case 2:
      launch_split<unsigned short>(hidden, stride_b_bytes, stride_l_bytes, L, n_src_rows, gather_index,
                                   n_rows, row_bytes, out, stream);
      break;
    default:
      launch_split<unsigned char>(hidden, stride_b_bytes, stride_l_bytes, L, n_src_rows, gather_index,
                                  n_rows, row_bytes, out, stream);
      break;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t dpvr_fuse_merge_cuda(const void* text, int64_t text_stride_bytes, const void* image,
                                            int64_t image_stride_bytes, const void* base,
                                            int64_t base_stride_b_bytes, int64_t base_stride_l_bytes,
                                            const int64_t* merge_index, int64_t T, int64_t V, int64_t B,
                                            int64_t L, int64_t row_bytes, void* out,
                                            cudaStream_t stream) {
  const int64_t n_rows = B * L;
  if (n_rows <= 0 || row_bytes <= 0) return cudaSuccess;
  const int64_t n_src_rows = T + V;
  uint64_t bits = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uintptr_t>(out) |
                  reinterpret_cast<uintptr_t>(text) | reinterpret_cast<uintptr_t>(image) |
                  static_cast<uint64_t>(text_stride_bytes) | static_cast<uint64_t>(image_stride_bytes);
  if (base != nullptr) {
    bits |= reinterpret_cast<uintptr_t>(base) | static_cast<uint64_t>(base_stride_b_bytes) |
            static_cast<uint64_t>(base_stride_l_bytes);
  }
  switch (vector_bytes(bits)) {
    case 16:
      launch_merge<uint4>(text, text_stride_bytes, image, image_stride_bytes, base, base_stride_b_bytes,
                          base_stride_l_bytes, merge_index, T, n_src_rows, L, n_rows, row_bytes, out,
                          stream);
      break;
    case 8:
      launch_merge<uint2>(text, text_stride_bytes, image, image_stride_bytes, base, base_stride_b_bytes,
                          base_stride_l_bytes, merge_index, T, n_src_rows, L, n_rows, row_bytes, out,
                          stream);
      break;
    case 4:
      launch_merge<unsigned int>(text, text_stride_bytes, image, image_stride_bytes, base,
                                 base_stride_b_bytes, base_stride_l_bytes, merge_index, T, n_src_rows, L,
                                 n_rows, row_bytes, out, stream);
      break;
    case 2:
      launch_merge<unsigned short>(text, text_stride_bytes, image, image_stride_bytes, base,
                                   base_stride_b_bytes, base_stride_l_bytes, merge_index, T, n_src_rows,
                                   L, n_rows, row_bytes, out, stream);
      break;
    default:
      launch_merge<unsigned char>(text, text_stride_bytes, image, image_stride_bytes, base,
                                  base_stride_b_bytes, base_stride_l_bytes, merge_index, T, n_src_rows,
                                  L, n_rows, row_bytes, out, stream);
      break;
  }
  return cudaGetLastError();
}
