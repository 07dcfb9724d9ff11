// Tile products of bfloat16 operands in native bfloat16 dot products (AVX512_BF16's
// vdpbf16ps: fp32 accumulators, each step adding a[2t] b[2t] + a[2t+1] b[2t+1]), with the
// packings they read. Only the AVX-512 build has them (SA_PAIR_PRODUCTS); the functions that use
// the instruction carry its target themselves and are called, not inlined, so the rest of
// the build still runs on AVX-512 processors without it (the dispatch asks the processor).
//
// The instruction treats subnormal inputs and results as 0, which the op does not: tiles that
// read a subnormal bfloat16 input are multiplied in the accumulation type instead
// (has_subnormal), so only intermediate P and dS values so small they cannot matter next to
// the others may be flushed.
//
// Operands are 32-bit "pairs" of bfloat16 along the summed dimension:
// - A, row-major [m x k2] (pairs of adjacent columns) or, when kTransA, stored as [k2 x m];
// - B, [k2 x n] with element (t, j) = (B[2t][j], B[2t + 1][j]) ("VNNI" layout).
// An odd summed dimension is padded with a zero.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "tile_ops.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

using Pair = uint32_t;

inline int64_t pairs_of(int64_t n) { return (n + 1) / 2; }

inline uint16_t bf16_bits(float x) { return c10::BFloat16(x).x; }
inline uint16_t bf16_bits(c10::BFloat16 x) { return x.x; }

// The pair of elements 2t and 2t + 1 of a row of n (the second 0 past the end).
template <typename S>
inline Pair pair_at(const S* row, int64_t n, int64_t t) {
  const uint32_t lo = bf16_bits(row[2 * t]);
  const uint32_t hi = 2 * t + 1 < n ? bf16_bits(row[2 * t + 1]) : 0;
  return lo | (hi << 16);
}

// Whether rows [0, rows) of src [rows x dim] hold a subnormal bfloat16 value (never, for
// other types).
template <typename S>
inline bool has_subnormal(int64_t, int64_t, const S*, int64_t) { return false; }

// dst[pairs_of(dim) x rows], dst[t][i] = pair t of row i: a B operand whose summed dimension
// runs along src's rows (Q^T, K^T, V^T of the score and dP products).
template <typename S>
inline void pack_pairs_transposed(int64_t rows, int64_t dim, const S* src, int64_t stride,
                                  Pair* dst) {
  const int64_t d2 = pairs_of(dim);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t t = 0; t < d2; ++t) dst[t * rows + i] = pair_at(src + i * stride, dim, t);
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
#define SA_PAIR_PRODUCTS 1
#define SA_PAIRS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), noinline))

// A subnormal bfloat16 has exponent bits 0 and mantissa bits not.
SA_PAIRS_TARGET inline bool has_subnormal(int64_t rows, int64_t dim, const c10::BFloat16* src,
                                          int64_t stride) {
  const __m512i exponent = _mm512_set1_epi16(0x7F80), mantissa = _mm512_set1_epi16(0x007F);
  __mmask32 found = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const c10::BFloat16* row = src + i * stride;
    for (int64_t j = 0; j < dim; j += 32) {
      const __mmask32 cols = dim - j >= 32 ? ~__mmask32(0) : __mmask32((1u << (dim - j)) - 1);
      const __m512i x = _mm512_maskz_loadu_epi16(cols, row + j);
      found |= _mm512_testn_epi16_mask(x, exponent) & _mm512_test_epi16_mask(x, mantissa);
    }
  }
  return found != 0;
}

// dst[rows x pairs_of(dim)]: each row's adjacent elements paired (A operands, row-major),
// which is the row itself in bfloat16.
template <typename S>
SA_PAIRS_TARGET void pack_pairs(int64_t rows, int64_t dim, const S* src, int64_t stride,
                                Pair* dst) {
  const int64_t d2 = pairs_of(dim);
  for (int64_t i = 0; i < rows; ++i) {
    const S* row = src + i * stride;
    Pair* out = dst + i * d2;
    int64_t t = 0;
    if constexpr (std::is_same_v<S, float>) {
      for (; 2 * t + 32 <= dim; t += 16) {
        const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 2 * t + 16),
                                                  _mm512_loadu_ps(row + 2 * t));
        _mm512_storeu_si512(out + t, (__m512i)both);
      }
    } else {
      t = dim / 2;
      std::memcpy(out, row, t * sizeof(Pair));
    }
    for (; t < d2; ++t) out[t] = pair_at(row, dim, t);
  }
}

// dst[pairs_of(rows) x dim], dst[t][j] = (src[2t][j], src[2t + 1][j]): rows paired, for a B
// operand summed over src's rows, or an A^T operand (kTransA) of one.
template <typename S>
SA_PAIRS_TARGET void pack_row_pairs(int64_t rows, int64_t dim, const S* src, int64_t stride,
                                    Pair* dst) {
  for (int64_t t = 0; 2 * t < rows; ++t) {
    const S* lo = src + 2 * t * stride;
    const S* hi = 2 * t + 1 < rows ? lo + stride : nullptr;
    Pair* out = dst + t * dim;
    int64_t j = 0;
    for (; j + 16 <= dim; j += 16) {
      __m256i a, b = _mm256_setzero_si256();
      if constexpr (std::is_same_v<S, float>) {
        a = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + j));
        if (hi) b = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(hi + j));
      } else {
        a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + j));
        if (hi) b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + j));
      }
      const __m512i pairs = _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                                            _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(out + j, pairs);
    }
    for (; j < dim; ++j) {
      out[j] = bf16_bits(lo[j]) | (hi ? uint32_t(bf16_bits(hi[j])) << 16 : 0u);
    }
  }
}

// C[R x n] = (kAccumulate ? C : 0) + A[R x k2 pairs] B[k2 x n], R rows held in registers.
struct PairRows {
  template <typename C>
  static constexpr int64_t width() { return 32; }
  template <int R, bool kAccumulate, bool kTransA>
  SA_PAIRS_TARGET static void rows(int64_t n, int64_t k2, const Pair* a, int64_t lda,
                                   const Pair* b, int64_t ldb, float* c, int64_t ldc) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) {
        acc[r][0] = kAccumulate ? _mm512_loadu_ps(c + r * ldc + j) : _mm512_setzero_ps();
        acc[r][1] = kAccumulate ? _mm512_loadu_ps(c + r * ldc + j + 16) : _mm512_setzero_ps();
      }
      for (int64_t p = 0; p < k2; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * ldb + j);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * ldb + j + 16);
        for (int r = 0; r < R; ++r) {
          const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_at<kTransA>(a, lda, r, p)));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(c + r * ldc + j, acc[r][0]);
        _mm512_storeu_ps(c + r * ldc + j + 16, acc[r][1]);
      }
    }
    for (; j < n; j += 16) {
      const __mmask16 cols = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      __m512 acc[R];
      for (int r = 0; r < R; ++r) {
        acc[r] = kAccumulate ? _mm512_maskz_loadu_ps(cols, c + r * ldc + j) : _mm512_setzero_ps();
      }
      for (int64_t p = 0; p < k2; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(cols, b + p * ldb + j);
        for (int r = 0; r < R; ++r) {
          const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_at<kTransA>(a, lda, r, p)));
          acc[r] = _mm512_dpbf16_ps(acc[r], ar, b0);
        }
      }
      for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + j, cols, acc[r]);
    }
  }
};

// C[m x n] (+)= A B over k2 pairs of the summed dimension (see the top of the file).
template <bool kAccumulate, bool kTransA = false>
inline void gemm_pairs(int64_t m, int64_t n, int64_t k2, const Pair* a, int64_t lda,
                       const Pair* b, int64_t ldb, float* c, int64_t ldc) {
  gemm_with<PairRows, kAccumulate, kTransA>(m, n, k2, a, lda, b, ldb, c, ldc);
}

#undef SA_PAIRS_TARGET
#else
#define SA_PAIR_PRODUCTS 0
// Stubs, so that the kernels compile here too: the dispatch never picks the pair products
// in a build without them.
template <typename S>
inline void pack_pairs(int64_t, int64_t, const S*, int64_t, Pair*) {}
template <typename S>
inline void pack_row_pairs(int64_t, int64_t, const S*, int64_t, Pair*) {}
template <bool kAccumulate, bool kTransA = false>
inline void gemm_pairs(int64_t, int64_t, int64_t, const Pair*, int64_t, const Pair*, int64_t, float*,
                       int64_t) {}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
