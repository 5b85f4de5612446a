// CPU row-gather/scatter kernels for dpvr_kernels._C.
//
// Both kernels are byte copies (dtype-agnostic): every output row is D * element_size bytes and comes from
// one source row (or is zero-filled). Rows are split across threads with at::parallel_for; inside each
// chunk, runs of output rows whose sources are adjacent in memory are merged into a single memcpy (so the
// image block of a sample, or a run of consecutive text tokens, is one copy), and runs of zero rows into a
// single memset. Index values are trusted but checked: an out-of-range index skips the rest of its chunk
// and raises after the parallel loop, so a bad index can never read outside the source tensors.
//
// Tensor validation and allocation live in bindings.cpp; these functions take raw pointers and byte strides.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

namespace dpvr {
namespace cpu {
namespace {

// Smallest amount of work (bytes) worth handing to a separate thread.
constexpr int64_t kGrainBytes = int64_t{1} << 16;

inline int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
}

// Remembers the first (lowest) output row whose index was out of range.
class BadRow {
 public:
  void record(int64_t row) {
    int64_t cur = row_.load(std::memory_order_relaxed);
    while ((cur < 0 || row < cur) &&
           !row_.compare_exchange_weak(cur, row, std::memory_order_relaxed)) {
    }
  }
  int64_t get() const { return row_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> row_{-1};
};

// Copies n_rows rows of row_bytes into the contiguous `out`. resolve(r, &src) returns false for a bad index,
// else sets src to the source row (nullptr: zero row).
template <typename Resolve>
void copy_rows(int64_t n_rows, int64_t row_bytes, char* out, const Resolve& resolve, BadRow& bad) {
  if (n_rows <= 0 || row_bytes <= 0) return;
  at::parallel_for(0, n_rows, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    const char* src = nullptr;
    if (!resolve(begin, &src)) {
      bad.record(begin);
      return;
    }
    int64_t i = begin;
    while (i < end) {
      // Extend the run [i, j) while the next source row follows the previous one in memory.
      int64_t j = i + 1;
      const char* next = nullptr;
      const char* expect = src == nullptr ? nullptr : src + row_bytes;
      for (; j < end; ++j) {
        const char* p = nullptr;
        if (!resolve(j, &p)) {
          bad.record(j);
          return;
        }
        if (p != expect) {
          next = p;
          break;
        }
        if (expect != nullptr) expect += row_bytes;
      }
      char* dst = out + i * row_bytes;
      const size_t nbytes = static_cast<size_t>(j - i) * static_cast<size_t>(row_bytes);
      if (src != nullptr) {
        std::memcpy(dst, src, nbytes);
      } else {
        std::memset(dst, 0, nbytes);
      }
      i = j;
      src = next;
    }
  });
}

}  // namespace

void route_split(const char* hidden, int64_t stride_b_bytes, int64_t stride_l_bytes, int64_t B, int64_t L,
                 const int64_t* gather_index, int64_t n_rows, int64_t row_bytes, char* out) {
  const int64_t n_src = B * L;
  BadRow bad;
  auto resolve = [&](int64_t r, const char** src) -> bool {
    const int64_t g = gather_index[r];
    if (g < 0 || g >= n_src) return false;
    const int64_t b = g / L;
    const int64_t l = g - b * L;
    *src = hidden + b * stride_b_bytes + l * stride_l_bytes;
    return true;
  };
  copy_rows(n_rows, row_bytes, out, resolve, bad);
  const int64_t r = bad.get();
  TORCH_CHECK(r < 0, "dpvr_C::route_split: gather_index[", r, "] = ", r < 0 ? 0 : gather_index[r],
              " is out of range for hidden with B * L = ", n_src, " rows (valid: [0, ", n_src, "))");
}

void fuse_merge(const char* text, int64_t text_stride_bytes, const char* image, int64_t image_stride_bytes,
                const char* base, int64_t base_stride_b_bytes, int64_t base_stride_l_bytes,
                const int64_t* merge_index, int64_t T, int64_t V, int64_t B, int64_t L, int64_t row_bytes,
                char* out) {
  const int64_t n_rows = B * L;
  const int64_t n_src = T + V;
  BadRow bad;
  auto resolve = [&](int64_t r, const char** src) -> bool {
    const int64_t k = merge_index[r];
    if (k < 0) {
      if (base == nullptr) {
        *src = nullptr;
      } else {
        const int64_t b = r / L;
        const int64_t l = r - b * L;
        *src = base + b * base_stride_b_bytes + l * base_stride_l_bytes;
      }
    } else if (k < T) {
      *src = text + k * text_stride_bytes;
    } else if (k < n_src) {
      *src = image + (k - T) * image_stride_bytes;
    } else {
      return false;
    }
    return true;
  };
  copy_rows(n_rows, row_bytes, out, resolve, bad);
  const int64_t r = bad.get();
  TORCH_CHECK(r < 0, "dpvr_C::fuse_merge: merge_index[", r, "] = ", r < 0 ? 0 : merge_index[r],
              " is out of range: text has T = ", T, " rows and image V = ", V,
              " rows (valid: < T + V = ", n_src, "; negative selects base/zeros)");
}

}  // namespace cpu
}  // namespace dpvr
