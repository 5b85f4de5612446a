// Plain C interface of the CUDA row-gather/scatter kernels in route_cuda.cu.
//
// route_cuda.cu is compiled by nvcc on its own (no torch headers), so this header only needs the CUDA
// runtime API. All strides and sizes are in BYTES; index tensors are int64 device pointers. Every function
// enqueues work on `stream` and returns the result of cudaGetLastError() after its launches (cudaSuccess
// when nothing had to be launched).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// out[i, :] = hidden[gather_index[i] / L, gather_index[i] % L, :] for i in [0, n_rows), where `hidden`
// is [B, L, row]. Indices must lie in [0, B * L) (checked by a device assert: setup.py does not define NDEBUG for nvcc, so a bad index stops the kernel loudly).
// `hidden` points at element [0, 0, 0]; row (b, l) starts at hidden + b * stride_b_bytes + l * stride_l_bytes.
// `out` is contiguous: row i starts at out + i * row_bytes.
cudaError_t dpvr_route_split_cuda(const void* hidden, int64_t stride_b_bytes, int64_t stride_l_bytes,
                                  int64_t B, int64_t L, const int64_t* gather_index, int64_t n_rows,
                                  int64_t row_bytes, void* out, cudaStream_t stream);

// For every flat output row r = b * L + l (r in [0, B * L)), with k = merge_index[r]:
//   k < 0      -> out[r] = base[b, l]   (zeros when base == nullptr)
//   0 <= k < T -> out[r] = text[k]
//   k >= T     -> out[r] = image[k - T]
// Indices must be < T + V (device assert, as above). text/image rows are text_stride_bytes / image_stride_bytes apart (row_bytes when contiguous).
// `out` is contiguous [B, L, row]. Each output row is written exactly once.
cudaError_t dpvr_fuse_merge_cuda(const void* text, int64_t text_stride_bytes, const void* image,
                                 int64_t image_stride_bytes, const void* base /* nullable */,
                                 int64_t base_stride_b_bytes, int64_t base_stride_l_bytes,
                                 const int64_t* merge_index, int64_t T, int64_t V, int64_t B, int64_t L,
                                 int64_t row_bytes, void* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
