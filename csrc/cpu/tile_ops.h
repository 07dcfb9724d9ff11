// Small dense operations on row-major tiles in the accumulation type (float or double),
// vectorised with at::vec. Compiled once per CPU capability (see kernels_*.cpp), so every
// symbol lives in the capability's namespace.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// C[R x n] = (kAccumulate ? C : 0) + A[R x k] * B[k x n], R rows held in registers.
template <typename T, int R, bool kAccumulate>
inline void gemm_rows(int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                      T* c, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  int64_t j = 0;
  for (; j + 2 * kV <= n; j += 2 * kV) {
    Vec acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = kAccumulate ? Vec::loadu(c + r * ldc + j) : Vec(T(0));
      acc[r][1] = kAccumulate ? Vec::loadu(c + r * ldc + j + kV) : Vec(T(0));
    }
    for (int64_t p = 0; p < k; ++p) {
      const Vec b0 = Vec::loadu(b + p * ldb + j), b1 = Vec::loadu(b + p * ldb + j + kV);
      for (int r = 0; r < R; ++r) {
        const Vec ar(a[r * lda + p]);
        acc[r][0] = at::vec::fmadd(ar, b0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(ar, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      acc[r][0].store(c + r * ldc + j);
      acc[r][1].store(c + r * ldc + j + kV);
    }
  }
  for (; j < n; j += kV) {
    const int64_t cols = std::min<int64_t>(kV, n - j);
    Vec acc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = kAccumulate ? Vec::loadu(c + r * ldc + j, cols) : Vec(T(0));
    }
    for (int64_t p = 0; p < k; ++p) {
      const Vec b0 = Vec::loadu(b + p * ldb + j, cols);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec(a[r * lda + p]), b0, acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r].store(c + r * ldc + j, cols);
  }
}

// Rows of C held in registers at once: enough accumulators to hide FMA latency without
// spilling (32 vector registers with AVX-512, 16 with AVX2).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kGemmRows = 8;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kGemmRows = 6;
#else
constexpr int kGemmRows = 4;
#endif

// The last m < R rows of a product, one register-blocked height at a time.
template <typename T, int R, bool kAccumulate>
inline void gemm_tail_rows(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                           int64_t ldb, T* c, int64_t ldc) {
  if constexpr (R > 1) {
    if (m == R - 1) return gemm_rows<T, R - 1, kAccumulate>(n, k, a, lda, b, ldb, c, ldc);
    gemm_tail_rows<T, R - 1, kAccumulate>(m, n, k, a, lda, b, ldb, c, ldc);
  }
}

// C[m x n] (+)= A[m x k] * B[k x n], all row-major with the given leading dimensions.
template <bool kAccumulate, typename T>
inline void gemm_nn(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kGemmRows <= m; i += kGemmRows) {
    gemm_rows<T, kGemmRows, kAccumulate>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
  }
  gemm_tail_rows<T, kGemmRows, kAccumulate>(m - i, n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
}

// dst[c x r] = src[r x c]^T.
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst,
                      int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

// dst[r x D] = src rows converted to T and multiplied by `mul`.
template <typename T, typename scalar_t>
inline void load_rows(int64_t rows, int64_t dim, const scalar_t* src, int64_t row_stride,
                      T mul, T* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* s = src + i * row_stride;
    T* d = dst + i * dim;
    for (int64_t j = 0; j < dim; ++j) d[j] = static_cast<T>(s[j]) * mul;
  }
}

// dst[D x r] = (src rows converted to T)^T, so that X * src^T becomes a plain NN product.
template <typename T, typename scalar_t>
inline void load_rows_transposed(int64_t rows, int64_t dim, const scalar_t* src,
                                 int64_t row_stride, T* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* s = src + i * row_stride;
    for (int64_t j = 0; j < dim; ++j) dst[j * ld_dst + i] = static_cast<T>(s[j]);
  }
}

// Writes src[r x D] * mul to rows of the output in its own dtype.
template <typename T, typename scalar_t>
inline void store_rows(int64_t rows, int64_t dim, const T* src, T mul, scalar_t* dst,
                       int64_t row_stride) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < dim; ++j) {
      dst[i * row_stride + j] = static_cast<scalar_t>(src[i * dim + j] * mul);
    }
  }
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  T result = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= kV) {
    Vec m = Vec::loadu(x);
    for (j = kV; j + kV <= n; j += kV) m = at::vec::maximum(m, Vec::loadu(x + j));
    result = at::vec::vec_reduce_all<T>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  }
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

// x[j] = exp(x[j] - shift) in place; returns the sum. shift must be finite.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T shift) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  const Vec vshift(shift);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + kV <= n; j += kV) {
    const Vec e = (Vec::loadu(x + j) - vshift).exp_u20();
    e.store(x + j);
    vsum = vsum + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// x[j] *= s.
template <typename T>
inline void scale_row(T* x, int64_t n, T s) {
  at::vec::map([s](Vectorized<T> v) { return v * Vectorized<T>(s); }, x, x, n);
}

// ds[j] = p[j] * (dp[j] - delta), in place in dp.
template <typename T>
inline void softmax_grad_row(const T* p, T* dp, int64_t n, T delta) {
  at::vec::map2([delta](Vectorized<T> pv, Vectorized<T> dpv) {
    return pv * (dpv - Vectorized<T>(delta));
  }, dp, p, dp, n);
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
