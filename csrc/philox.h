// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind attention dropout: the bits of element (batch, head, query,
// key) come from its coordinates and the seed alone, so the backward pass drops exactly what
// the forward pass dropped without a stored mask, on any thread count or device.
// sparse_attention/reference.py computes the same bits in torch for the reference.
#pragma once

#include <cstdint>

#include "block_rules.h"  // SA_HOST_DEVICE

namespace sparse_attention {

struct Philox {
  static constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  static constexpr uint32_t kKeyStep0 = 0x9E3779B9u, kKeyStep1 = 0xBB67AE85u;
  static constexpr int kRounds = 10;

  // The four words of counter (c0, c1, c2, c3) under key (k0, k1), in place.
  SA_HOST_DEVICE static void block(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                   uint32_t k0, uint32_t k1) {
    for (int round = 0; round < kRounds; ++round) {
      const uint64_t p0 = uint64_t{kMul0} * c0, p1 = uint64_t{kMul1} * c2;
      const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      c0 = hi1 ^ c1 ^ k0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ k1;
      c3 = lo0;
      k0 += kKeyStep0;
      k1 += kKeyStep1;
    }
  }
};

// Attention dropout's bits: 16 per element (query, key) of a (batch, head), queries in groups
// of 64 that one Philox block covers. With g = query / 64, o = query % 64, lane = o % 8 and
// r = o / 8: counter (8 g + lane, key, head, batch) under the seed's two words, half r % 2 (0 =
// low) of word r / 2. So 8 Philox lanes give 8 runs of 8 consecutive queries. The element is
// kept when its 16 bits are at least dropout_threshold(p). Queries and keys are rows of the q
// and k tensors (packed documents count from the row's start).
struct DropoutCoordinates {
  uint32_t seed_lo, seed_hi, head, batch;
};

constexpr int kDropoutQueries = 64;  // per Philox block
constexpr int kDropoutLanes = 8;

// The 16-bit values below which an element is dropped: p rounded to a multiple of 2^-16
// (p in [0, 1)), as FlashAttention rounds it to 2^-8.
SA_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
}

}  // namespace sparse_attention
