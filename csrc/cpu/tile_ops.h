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
#include <type_traits>

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Element (r, p) of A, stored row-major with leading dimension lda, or transposed (A^T stored
// row-major) when kTransA. Both cost one broadcast load in the micro-kernel.
template <bool kTransA, typename T>
inline T a_at(const T* a, int64_t lda, int64_t r, int64_t p) {
  return kTransA ? a[p * lda + r] : a[r * lda + p];
}

// C[R x n] = (kAccumulate ? C : 0) + A[R x k] * B[k x n], R rows held in registers, two
// vectors of columns at a time.
struct VecRows {
  template <typename T>
  static constexpr int64_t width() { return 2 * Vectorized<T>::size(); }

  template <int R, bool kAccumulate, bool kTransA, typename T>
  static void rows(int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
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
          const Vec ar(a_at<kTransA>(a, lda, r, p));
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
        for (int r = 0; r < R; ++r) {
          acc[r] = at::vec::fmadd(Vec(a_at<kTransA>(a, lda, r, p)), b0, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) acc[r].store(c + r * ldc + j, cols);
    }
  }
};

// Rows of C held in registers at once: enough accumulators to hide FMA latency without
// spilling (32 vector registers with AVX-512, 16 with AVX2).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kGemmRows = 8;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kGemmRows = 6;
#else
constexpr int kGemmRows = 4;
#endif

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kPrefetchOperands = true;
#else
constexpr bool kPrefetchOperands = false;
#endif

// The last m < R rows of a product, one register-blocked height at a time.
template <typename Kernel, int R, bool kAccumulate, bool kTransA, typename A, typename B, typename C>
inline void gemm_tail_rows(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const B* b,
                           int64_t ldb, C* c, int64_t ldc) {
  if constexpr (R > 1) {
    if (m == R - 1) {
      return Kernel::template rows<R - 1, kAccumulate, kTransA>(n, k, a, lda, b, ldb, c, ldc);
    }
    gemm_tail_rows<Kernel, R - 1, kAccumulate, kTransA>(m, n, k, a, lda, b, ldb, c, ldc);
  }
}

// The part of a product that rows [i0, i1) of C need in columns [j0, j1): the summed indices
// [p0, p1), the others being known zeros of A, or none (p1 <= p0: those rows stay as they
// are). Whole: all of them.
struct Span {
  int64_t p0, p1;
};
struct Whole {
  int64_t k;
  Span operator()(int64_t, int64_t, int64_t, int64_t) const { return {0, k}; }
};

// C[m x n] (+)= op(A)[m x k] * B[k x n] with Kernel::rows doing R rows of C at a time: B and C
// row-major, A row-major [m x k] or, when kTransA, stored as A^T [k x m]; lda is the leading
// dimension of what is stored. B is walked one panel of Kernel::width columns at a time, for
// all rows of C: the panel stays in L1 while the rows of A stream past it.
template <typename Kernel, bool kAccumulate, bool kTransA, typename A, typename B, typename C,
          typename Extent = Whole>
inline void gemm_with(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const B* b,
                      int64_t ldb, C* c, int64_t ldc, const Extent& extent = Whole{0}) {
  const auto strip = [&](int64_t i, int64_t rows, int64_t j, int64_t panel) {
    const Span e = std::is_same_v<Extent, Whole> ? Span{0, k} : extent(i, i + rows, j, j + panel);
    if (e.p1 <= e.p0) return;
    const A* a_strip = kTransA ? a + e.p0 * lda + i : a + i * lda + e.p0;
    const B* b_strip = b + e.p0 * ldb + j;
    if (rows == kGemmRows) {
      Kernel::template rows<kGemmRows, kAccumulate, kTransA>(panel, e.p1 - e.p0, a_strip, lda, b_strip,
                                                             ldb, c + i * ldc + j, ldc);
    } else {
      gemm_tail_rows<Kernel, kGemmRows, kAccumulate, kTransA>(rows, panel, e.p1 - e.p0, a_strip, lda,
                                                              b_strip, ldb, c + i * ldc + j, ldc);
    }
  };
  constexpr int64_t kLine = 64;  // bytes
  for (int64_t j = 0; j < n; j += Kernel::template width<C>()) {
    const int64_t panel = std::min<int64_t>(Kernel::template width<C>(), n - j);
    // Operands stream in from L2 or beyond (key and value rows of blocks far apart): ask for
    // the next panel of B, and in the first panel the next strip's rows of A, a strip ahead.
    // It paid in the AVX-512 build's forward (2-5%); the AVX2 build's backward ran 3-5% slower
    // with it.
    if (kPrefetchOperands && j + panel < n) {
      const int64_t next_bytes = std::min<int64_t>(Kernel::template width<C>(), n - j - panel) * sizeof(B);
      for (int64_t p = 0; p < k; ++p) {
        const char* row = reinterpret_cast<const char*>(b + p * ldb + j + panel);
        for (int64_t c = 0; c < next_bytes; c += kLine) __builtin_prefetch(row + c);
      }
    }
    for (int64_t i = 0; i < m; i += kGemmRows) {
      if (kPrefetchOperands && !kTransA && j == 0) {
        for (int64_t r = i + kGemmRows; r < std::min<int64_t>(m, i + 2 * kGemmRows); ++r) {
          for (int64_t p = 0; p < k; p += kLine / int64_t(sizeof(A))) __builtin_prefetch(a + r * lda + p);
        }
      }
      strip(i, std::min<int64_t>(kGemmRows, m - i), j, panel);
    }
  }
}

// gemm_with in the accumulation type's vectors.
template <bool kAccumulate, bool kTransA = false, typename T, typename Extent = Whole>
inline void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T* c, int64_t ldc, const Extent& extent = Whole{0}) {
  gemm_with<VecRows, kAccumulate, kTransA>(m, n, k, a, lda, b, ldb, c, ldc, extent);
}

// Products with few queries (decode steps, speculative verification), where the register
// blocking above would fill one lane of each vector with a query and leave the rest idle.

// C[m x n] = A[m x k] B[n x k]^T for a small n: each element a dot product along k, vectorised
// along k and reduced across lanes, kDotRows rows of A at a time so that their FMA chains
// overlap. The vectors past k load zeros from A and B alike.
template <typename T>
inline void gemm_dots(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                      int64_t ldb, T* c, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  constexpr int kDotRows = 8;
  const auto load = [&](const T* at, int64_t p) { return p + kV <= k ? Vec::loadu(at + p) : Vec::loadu(at + p, k - p); };
  const auto sum = [](const Vec& x) { return at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, x); };
  int64_t r = 0;
  for (; r + kDotRows <= m; r += kDotRows) {
    for (int64_t i = 0; i < n; ++i) {
      Vec acc[kDotRows];
      for (int t = 0; t < kDotRows; ++t) acc[t] = Vec(T(0));
      for (int64_t p = 0; p < k; p += kV) {
        const Vec bv = load(b + i * ldb, p);
        for (int t = 0; t < kDotRows; ++t) acc[t] = at::vec::fmadd(load(a + (r + t) * lda, p), bv, acc[t]);
      }
      for (int t = 0; t < kDotRows; ++t) c[(r + t) * ldc + i] = sum(acc[t]);
    }
  }
  for (; r < m; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      Vec acc(T(0));
      for (int64_t p = 0; p < k; p += kV) acc = at::vec::fmadd(load(a + r * lda, p), load(b + i * ldb, p), acc);
      c[r * ldc + i] = sum(acc);
    }
  }
}

// C[m x n] += A[m x k] B[k x n] for a small m, A stored transposed (a_t [k x m]): each row of
// C held in up to kHeldVectors registers across all of k, so that many FMA chains overlap
// where the blocking above would have two.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr int kHeldVectors = 8;
#else
constexpr int kHeldVectors = 4;
#endif

template <int kVectors, typename T>
inline void add_products_held(int64_t k, const T* a_t, int64_t lda, const T* b, int64_t ldb,
                              T* c, int64_t last_count) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  const auto count = [&](int v) { return v + 1 == kVectors ? last_count : kV; };
  Vec acc[kVectors];
  for (int v = 0; v < kVectors; ++v) acc[v] = Vec::loadu(c + v * kV, count(v));
  for (int64_t p = 0; p < k; ++p) {
    const Vec w(a_t[p * lda]);
    for (int v = 0; v < kVectors; ++v) {
      const Vec bv = count(v) == kV ? Vec::loadu(b + p * ldb + v * kV) : Vec::loadu(b + p * ldb + v * kV, count(v));
      acc[v] = at::vec::fmadd(w, bv, acc[v]);
    }
  }
  for (int v = 0; v < kVectors; ++v) acc[v].store(c + v * kV, count(v));
}

template <int kVectors = kHeldVectors, typename T>
inline void add_products_held_upto(int vectors, int64_t k, const T* a_t, int64_t lda, const T* b,
                                   int64_t ldb, T* c, int64_t last_count) {
  if constexpr (kVectors > 1) {
    if (vectors < kVectors) {
      return add_products_held_upto<kVectors - 1>(vectors, k, a_t, lda, b, ldb, c, last_count);
    }
  }
  add_products_held<kVectors>(k, a_t, lda, b, ldb, c, last_count);
}

template <typename T>
inline void add_products_few_rows(int64_t m, int64_t n, int64_t k, const T* a_t, int64_t lda,
                                  const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int64_t kV = Vectorized<T>::size(), kPanel = kHeldVectors * kV;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; j += kPanel) {
      const int64_t cols = std::min(kPanel, n - j);
      const int vectors = static_cast<int>((cols + kV - 1) / kV);
      add_products_held_upto(vectors, k, a_t + i, lda, b + j, ldb, c + i * ldc + j, cols - (vectors - 1) * kV);
    }
  }
}

// dst[r x D] = src rows converted to T and multiplied by `mul`.
template <typename T, typename scalar_t>
inline void load_rows(int64_t rows, int64_t dim, const scalar_t* src, int64_t row_stride,
                      T mul, T* dst) {
  constexpr bool kReduced =
      std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* s = src + i * row_stride;
    T* d = dst + i * dim;
    int64_t j = 0;
    if constexpr (kReduced && std::is_same_v<T, float>) {  // vector conversion (F16C, shifts)
      using Vec = Vectorized<float>;
      for (; j + Vec::size() <= dim; j += Vec::size()) {
        Vec x;
        at::vec::load_to_float(s + j, x);
        (x * Vec(mul)).store(d + j);
      }
    }
    for (; j < dim; ++j) d[j] = static_cast<T>(s[j]) * mul;
  }
}

// dst[n x m] = src[m x n]^T for float tiles: at::vec's register transposes (16 x 16 blocks of
// any size with AVX-512, whole 8 x 8 blocks with AVX2), element by element elsewhere.
template <typename T>
inline void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t m, int64_t n) {
  int64_t i0 = 0, j0 = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(m), static_cast<int>(n));
#elif defined(CPU_CAPABILITY_AVX2)
    i0 = m / 8 * 8, j0 = n / 8 * 8;
    for (int64_t i = 0; i < i0; i += 8) {
      for (int64_t j = 0; j < j0; j += 8) {
        at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      }
    }
#endif
  }
  // What the blocks left: columns [j0, n) of rows [0, i0), then rows [i0, m).
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = i < i0 ? j0 : 0; j < n; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

// dst[D x r] = mul * (src rows converted to T)^T: loaded once per task, so that products with
// src^T become plain row-major products.
template <typename T, typename scalar_t>
inline void load_rows_transposed(int64_t rows, int64_t dim, const scalar_t* src,
                                 int64_t row_stride, T mul, T* dst, int64_t ld_dst) {
  // Sixteen rows at a time converted and scaled into a tile that stays in L1, then transposed.
  constexpr int64_t kRows = 16, kMaxDim = 256;
  alignas(64) T tile[kRows * kMaxDim];
  for (int64_t i = 0; i < rows; i += kRows) {
    const int64_t r = std::min(kRows, rows - i);
    for (int64_t d = 0; d < dim; d += kMaxDim) {
      const int64_t cols = std::min(kMaxDim, dim - d);
      load_rows(r, cols, src + i * row_stride + d, row_stride, mul, tile);
      transpose_tile(tile, cols, dst + d * ld_dst + i, ld_dst, r, cols);
    }
  }
}

// Rows of an operand in the accumulation type with their leading dimension.
template <typename T>
struct RowsView {
  const T* data;
  int64_t ld;
};

// Rows [0, rows) at src: the operand itself when it already has the accumulation type (no
// copy), else a converted copy in scratch [rows x D].
template <typename T, typename scalar_t>
inline RowsView<T> rows_as(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t dim,
                           T* scratch) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    return {src, row_stride};
  } else {
    load_rows(rows, dim, src, row_stride, T(1), scratch);
    return {scratch, dim};
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

// exp(x) for the softmax's probabilities, in float with AVX2 or AVX-512: 2^n e^r for
// n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so that n ln 2's first part is
// exact), e^r by its Taylor series to r^7 (|r| <= ln 2 / 2: within 2 ulp), then times 2^n,
// 14 instructions against at::vec's exp_u20's 18 (which is within 20 ulp, and the fallback for
// other types and builds). Both keep NaN, and give 0 at -inf, as hidden keys need. The softmax
// passes x <= 0 (scores less their maximum or lse); with AVX2, x above 88 gives e^88.
template <typename T>
inline Vectorized<T> exp_softmax(const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    using Vec = Vectorized<float>;
    constexpr float kTaylor[] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
    // Clamped where e^x rounds to 0 (e^-110; with AVX2 at -88.3, where n = -127 makes the
    // exponent bits of 2^n those of +0) and, with AVX2, at 88, below n = 128 (vscalefps gives
    // inf itself). The clamps return x where x is NaN.
#if defined(CPU_CAPABILITY_AVX512)
    const Vec v = at::vec::clamp_min(x, Vec(-110.f));
#else
    const Vec v = at::vec::clamp(x, Vec(-88.3f), Vec(88.f));
#endif
    const Vec n = (v * Vec(1.44269504f)).round();
    const Vec r = at::vec::fmadd(n, Vec(-1.42860677e-6f), at::vec::fmadd(n, Vec(-0.693145752f), v));
    Vec e(kTaylor[7]);
    for (int t = 6; t >= 0; --t) e = at::vec::fmadd(e, r, Vec(kTaylor[t]));
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_scalef_ps(e, n);
#else
    const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return e * Vec(_mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
#endif
  }
#endif
  return x.exp_u20();
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
    const Vec e = exp_softmax(Vec::loadu(x + j) - vshift);
    e.store(x + j);
    vsum = vsum + e;
  }
  if (j < n) {
    const int64_t count = n - j;
    const Vec e = exp_softmax(Vec::loadu(x + j, count) - vshift);
    e.store(x + j, count);
    vsum = vsum + Vec::set(Vec(T(0)), e, count);
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

// tanh(x) for the soft cap, several times faster than Sleef's for float: tanh's odd series
// where |x| < 1/2 (there 1 - e would lose digits; its 8 terms leave 1e-8 relative), else
// sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1/e, exp_u20 as the softmax's own exp. Within
// 2 ulp; fp64 takes Sleef's tanh.
template <typename T>
inline Vectorized<T> tanh_fast(const Vectorized<T>& x) {
  if constexpr (!std::is_same_v<T, float>) {
    return x.tanh();
  } else {
    using Vec = Vectorized<float>;
    // Taylor coefficients of tanh(x) / x in x^2.
    constexpr float kSeries[] = {1.f, -1.f / 3, 2.f / 15, -17.f / 315, 62.f / 2835, -1382.f / 155925,
                                 21844.f / 6081075, -929569.f / 638512875};
    const Vec a = x.abs(), x2 = x * x;
    Vec series(kSeries[7]);
    for (int t = 6; t >= 0; --t) series = at::vec::fmadd(series, x2, Vec(kSeries[t]));
    const Vec large_lanes = a >= Vec(0.5f);
    // Scores well inside the cap, the usual case, need no exp.
    if (large_lanes.zero_mask() == (1 << Vec::size()) - 1) return series * x;
    const Vec e = (a * Vec(-2.f)).exp_u20();
    const Vec large = ((Vec(1.f) - e) / (Vec(1.f) + e)).copysign(x);
    return Vec::blendv(series * x, large, large_lanes);
  }
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

// Column-wise forms, for tiles stored transposed (one row per key, one column per query).
// A walk over such a tile keeps each column's running value in registers across all its rows:
// kColumnVectors vectors of columns at a time, then one vector at a time, the last partial.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kColumnVectors = 4;
#else
constexpr int kColumnVectors = 2;
#endif

// group(vectors, i, count) for the groups of columns [0, n): `vectors` (an integral_constant)
// vectors from column i, the last of them holding `count` columns.
template <typename T, typename Group>
inline void for_column_groups(int64_t n, const Group& group) {
  constexpr int64_t kV = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + kColumnVectors * kV <= n; i += kColumnVectors * kV) {
    group(std::integral_constant<int, kColumnVectors>{}, i, kV);
  }
  for (; i < n; i += kV) group(std::integral_constant<int, 1>{}, i, std::min<int64_t>(kV, n - i));
}

// new_max[i] = max(m[i], x[r][i] over rows r) of x [rows x n]. A NaN score need not win:
// exp_softmax keeps it, so it makes the row's sum, lse and output NaN all the same.
template <typename T>
inline void column_max(const T* x, int64_t rows, int64_t n, const T* m, T* new_max) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  if (n == 1) {  // one query: its column is contiguous, walked along the keys
    Vec top(m[0]);
    for (int64_t r = 0; r < rows; r += kV) {
      const int64_t count = std::min(kV, rows - r);
      top = at::vec::clamp_min(Vec::set(top, Vec::loadu(x + r, count), count), top);
    }
    new_max[0] = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::clamp_min(a, b); }, top);
    return;
  }
  for_column_groups<T>(n, [&](auto vectors, int64_t i, int64_t count) {
    constexpr int kNV = decltype(vectors)::value;
    const auto load = [&](const T* at) { return count == kV ? Vec::loadu(at) : Vec::loadu(at, count); };
    Vec top[kNV];
    for (int v = 0; v < kNV; ++v) top[v] = load(m + i + v * kV);
    for (int64_t r = 0; r < rows; ++r) {
      for (int v = 0; v < kNV; ++v) top[v] = at::vec::clamp_min(load(x + r * n + i + v * kV), top[v]);
    }
    for (int v = 0; v < kNV; ++v) top[v].store(new_max + i + v * kV, count);
  });
}

// x[r][i] = exp(x[r][i] - shift[i]) in place over x [rows x n]; sum[i] = the column's sum, in
// row order, when sum is given.
template <typename T>
inline void exp_shift_columns(T* x, int64_t rows, int64_t n, const T* shift, T* sum) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  if (n == 1) {  // one query: its column is contiguous
    const T total = exp_shift_sum(x, rows, shift[0]);
    if (sum) sum[0] = total;
    return;
  }
  for_column_groups<T>(n, [&](auto vectors, int64_t i, int64_t count) {
    constexpr int kNV = decltype(vectors)::value;
    const auto load = [&](const T* at) { return count == kV ? Vec::loadu(at) : Vec::loadu(at, count); };
    Vec shifts[kNV], sums[kNV];
    for (int v = 0; v < kNV; ++v) {
      shifts[v] = load(shift + i + v * kV);
      sums[v] = Vec(T(0));
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int v = 0; v < kNV; ++v) {
        T* at = x + r * n + i + v * kV;
        const Vec e = exp_softmax(load(at) - shifts[v]);
        e.store(at, count);
        sums[v] = sums[v] + e;
      }
    }
    if (sum) {
      for (int v = 0; v < kNV; ++v) sums[v].store(sum + i + v * kV, count);
    }
  });
}

// The online softmax's step for n queries with a block's maximum new_max[i] and sum
// block_sum[i]: correction[i] = exp(m[i] - new_max[i]) (0 for a query that has seen nothing
// yet), l[i] = l[i] * correction[i] + block_sum[i], m[i] = new_max[i].
template <typename T>
inline void online_softmax_step(T* m, const T* new_max, T* l, const T* block_sum, T* correction,
                                int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  const Vec neg_inf(-std::numeric_limits<T>::infinity()), zero(T(0));
  for (int64_t i = 0; i < n; i += kV) {
    const int64_t count = std::min<int64_t>(kV, n - i);
    const Vec old_max = Vec::loadu(m + i, count), block_max = Vec::loadu(new_max + i, count);
    const Vec c = Vec::blendv((old_max - block_max).exp(), zero, old_max == neg_inf);
    c.store(correction + i, count);
    at::vec::fmadd(Vec::loadu(l + i, count), c, Vec::loadu(block_sum + i, count)).store(l + i, count);
    block_max.store(m + i, count);
  }
}

// ds[i] = p[i] * (dp[i] - delta[i]), in place in dp.
template <typename T>
inline void softmax_grad_columns(const T* p, T* dp, const T* delta, int64_t n) {
  at::vec::map3([](Vectorized<T> pv, Vectorized<T> dpv, Vectorized<T> d) { return pv * (dpv - d); },
                dp, p, dp, delta, n);
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
