// Philox4x32-10 (../philox.h) on kPhiloxLanes counters at once, in the capability's vector
// registers: 16 lanes with AVX-512, 8 with AVX2, 8 plain ones otherwise. The 32 x 32 -> 64-bit
// products take two even-lane multiplies (vpmuludq) per vector, which compilers do not find on
// their own from uint64 arithmetic.
#pragma once

#include <cstdint>

#include "../philox.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPhiloxLanes = 16;
using PhiloxVec = __m512i;
inline void philox_store(uint32_t* p, PhiloxVec v) { _mm512_storeu_si512(p, v); }
inline PhiloxVec philox_set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline PhiloxVec philox_xor3(PhiloxVec a, PhiloxVec b, PhiloxVec c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline void philox_mulhilo(PhiloxVec a, PhiloxVec m, PhiloxVec* hi, PhiloxVec* lo) {
  const PhiloxVec even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kPhiloxLanes = 8;
using PhiloxVec = __m256i;
inline void philox_store(uint32_t* p, PhiloxVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline PhiloxVec philox_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline PhiloxVec philox_xor3(PhiloxVec a, PhiloxVec b, PhiloxVec c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline void philox_mulhilo(PhiloxVec a, PhiloxVec m, PhiloxVec* hi, PhiloxVec* lo) {
  const PhiloxVec even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#else
constexpr int kPhiloxLanes = 8;
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Lanes of blocks of 8: (first[b] + l, second[b]) in lane 8 b + l.
template <int kBlockLanes>
inline void philox_counters(const uint32_t (&first)[2], const uint32_t (&second)[2], PhiloxVec* c0,
                            PhiloxVec* c1) {
  static_assert(kBlockLanes == 8, "two blocks of 8 lanes");
  const auto halves = [](uint32_t lo, uint32_t hi) {
    return _mm512_inserti64x4(_mm512_set1_epi32(static_cast<int>(lo)), _mm256_set1_epi32(static_cast<int>(hi)), 1);
  };
  *c0 = _mm512_add_epi32(halves(first[0], first[1]), _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0));
  *c1 = halves(second[0], second[1]);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <int kBlockLanes>
inline void philox_counters(const uint32_t (&first)[1], const uint32_t (&second)[1], PhiloxVec* c0,
                            PhiloxVec* c1) {
  static_assert(kBlockLanes == 8, "one block of 8 lanes");
  *c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first[0])), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
  *c1 = _mm256_set1_epi32(static_cast<int>(second[0]));
}
#endif

// Blocks of kBlockLanes consecutive counters: block b's lane l counts (first[b] + l, second[b],
// third, fourth). out[w][b * kBlockLanes + l] = word w of lane l of block b's Philox output
// under key (k0, k1). The counters are built in registers: written lane by lane to memory and
// read back as one vector they would stall on store forwarding.
template <int kBlockLanes>
inline void philox_blocks(const uint32_t (&first)[kPhiloxLanes / kBlockLanes],
                          const uint32_t (&second)[kPhiloxLanes / kBlockLanes], uint32_t third,
                          uint32_t fourth, uint32_t k0, uint32_t k1, uint32_t (&out)[4][kPhiloxLanes]) {
  static_assert(kPhiloxLanes % kBlockLanes == 0, "blocks fill the lanes");
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  PhiloxVec c0, c1;
  philox_counters<kBlockLanes>(first, second, &c0, &c1);
  PhiloxVec c2 = philox_set1(third), c3 = philox_set1(fourth);
  const PhiloxVec m0 = philox_set1(Philox::kMul0), m1 = philox_set1(Philox::kMul1);
  for (int round = 0; round < Philox::kRounds; ++round) {
    PhiloxVec hi0, lo0, hi1, lo1;
    philox_mulhilo(c0, m0, &hi0, &lo0);
    philox_mulhilo(c2, m1, &hi1, &lo1);
    c0 = philox_xor3(hi1, c1, philox_set1(k0));
    c1 = lo1;
    c2 = philox_xor3(hi0, c3, philox_set1(k1));
    c3 = lo0;
    k0 += Philox::kKeyStep0;
    k1 += Philox::kKeyStep1;
  }
  philox_store(out[0], c0);
  philox_store(out[1], c1);
  philox_store(out[2], c2);
  philox_store(out[3], c3);
#else
  for (int l = 0; l < kPhiloxLanes; ++l) {
    out[0][l] = first[l / kBlockLanes] + static_cast<uint32_t>(l % kBlockLanes);
    out[1][l] = second[l / kBlockLanes];
    out[2][l] = third;
    out[3][l] = fourth;
    Philox::block(out[0][l], out[1][l], out[2][l], out[3][l], k0, k1);
  }
#endif
}

// Dropout's scales of 16 consecutive queries, from the 8 words that hold their bits (the low
// halves for the first 8, the high halves for the next: philox.h's runs 2w and 2w + 1):
// dst[i] = scale or 0, or with kMultiply dst[i] *= scale or 0. Only where the vector units
// have it (kDropoutSixteen); the caller takes the elements one by one otherwise.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kDropoutSixteen = true;
template <bool kMultiply>
inline void dropout_sixteen(const uint32_t* words, uint32_t threshold, float scale, float* dst) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  const __m512i bits = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF))),
                                          _mm256_srli_epi32(v, 16), 1);
  const __mmask16 keep = _mm512_cmpge_epu32_mask(bits, _mm512_set1_epi32(static_cast<int>(threshold)));
  const __m512 scales = _mm512_set1_ps(scale);
  _mm512_storeu_ps(dst, kMultiply ? _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(dst), scales)
                                  : _mm512_maskz_mov_ps(keep, scales));
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kDropoutSixteen = true;
template <bool kMultiply>
inline void dropout_sixteen(const uint32_t* words, uint32_t threshold, float scale, float* dst) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  // 16-bit values: the signed comparison is the unsigned one.
  const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  const __m256i halves[2] = {_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(v, 16)};
  for (int h = 0; h < 2; ++h) {
    const __m256 scales = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(halves[h], below)), _mm256_set1_ps(scale));
    _mm256_storeu_ps(dst + 8 * h, kMultiply ? _mm256_mul_ps(_mm256_loadu_ps(dst + 8 * h), scales) : scales);
  }
}
#else
constexpr bool kDropoutSixteen = false;
template <bool kMultiply>
inline void dropout_sixteen(const uint32_t*, uint32_t, float, float*) {}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
