// The score terms (../score_terms.h) on the CPU kernels' tiles: one TileTerms per task holds
// the terms of its (sequence, head) and edits each block pair's scores between the product
// and the element mask; the dropout scales and the sums the bias gradients need are built
// tile by tile, in either orientation (attention_tile.h: row tiles s[qn x kn], column tiles
// s_t[kn x qn]).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../philox.h"
#include "../score_terms.h"
#include "tile_ops.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

// Philox blocks for kLanes consecutive counters c0 at once, laid out so that the compiler
// vectorises the rounds across lanes.
template <int kLanes>
inline void philox_lanes(uint32_t (&c)[4][kLanes], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < Philox::kRounds; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = uint64_t{Philox::kMul0} * c[0][l], p1 = uint64_t{Philox::kMul1} * c[2][l];
      const uint32_t c1 = c[1][l], c3 = c[3][l];
      c[0][l] = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c[1][l] = static_cast<uint32_t>(p1);
      c[2][l] = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c[3][l] = static_cast<uint32_t>(p0);
    }
    k0 += Philox::kKeyStep0;
    k1 += Philox::kKeyStep1;
  }
}

// The terms of one (sequence, head), with scratch for one block pair.
template <typename T>
struct TileTerms {
  const ScoreTerms& terms;
  const Problem& p;
  T softcap = 0, sink = 0, slope = 0;
  const T* table = nullptr;  // this head's row of the position bias
  DropoutCoordinates coords{};
  uint32_t threshold = 0;
  T keep_scale = 1;
  std::vector<T> diagonals;   // distance bias of the pair, by diagonal (distance_bias)
  std::vector<uint32_t> words;  // random words of one query's keys, from a multiple of 4 on

  TileTerms(const ScoreTerms& t, const Problem& problem)
      : terms(t), p(problem), diagonals(t.distance_bias() ? 2 * p.block_size : 0),
        words(t.dropout() ? p.block_size + 8 : 0) {
    softcap = static_cast<T>(t.softcap);
    threshold = dropout_threshold(t.dropout_p);
    keep_scale = static_cast<T>(1.0 / (1.0 - t.dropout_p));
    coords.seed_lo = static_cast<uint32_t>(t.seed);
    coords.seed_hi = static_cast<uint32_t>(t.seed >> 32);
  }

  void set_head(int64_t batch, int64_t head) {
    if (terms.sinks) sink = static_cast<const T*>(terms.sinks)[head];
    if (terms.alibi_slopes) {
      slope = static_cast<const T*>(terms.alibi_slopes)[(terms.alibi_batch > 1 ? batch : 0) * p.heads + head];
    }
    if (terms.position_bias) table = static_cast<const T*>(terms.position_bias) + head * terms.num_buckets;
    coords.head = static_cast<uint32_t>(head);
    coords.batch = static_cast<uint32_t>(batch);
  }

  // Distance d = key - query - offset of element (0, 0) of a row tile minus (qn - 1): the
  // tile's diagonal t = j - i + qn - 1 has distance first_distance + t.
  static int64_t first_distance(const Sequence& seq, int64_t q0, int64_t qn, int64_t k0) {
    return k0 - q0 - seq.window.offset - (qn - 1);
  }

  T bias_at(int64_t d) const {
    T b = 0;
    if (terms.alibi_slopes) b -= slope * static_cast<T>(d < 0 ? -d : d);
    if (table) b += table[terms.position_buckets[d + p.k_len - 1]];
    return b;
  }

  // The pair's distance bias by diagonal: for row tiles (kColumns false) diagonals[t] of
  // t = j - i + qn - 1, for column tiles reversed, diagonals[u] of u = i - j + kn - 1, so that
  // along each stored row the bias is read forwards.
  template <bool kColumns>
  const T* distance_bias(const Sequence& seq, int64_t q0, int64_t qn, int64_t k0, int64_t kn) {
    if (!terms.distance_bias()) return nullptr;
    const int64_t d0 = first_distance(seq, q0, qn, k0), n = qn + kn - 1;
    for (int64_t t = 0; t < n; ++t) diagonals[kColumns ? n - 1 - t : t] = bias_at(d0 + t);
    return diagonals.data();
  }

  // Scores of a tile (rows x cols, leading dimension ld) edited in place: soft-capped, with
  // cap_grad (when given, same layout) = d capped / d raw = 1 - tanh^2; then the distance bias
  // from distance_bias<kColumns> added. The element mask comes after.
  template <bool kColumns>
  void edit_scores(int64_t rows, int64_t cols, const T* bias, T* s, int64_t ld, T* cap_grad) const {
    using Vec = Vectorized<T>;
    if (softcap > 0) {
      const Vec c(softcap), inv(T(1) / softcap), one(T(1));
      for (int64_t r = 0; r < rows; ++r) {
        T* row = s + r * ld;
        for (int64_t x = 0; x < cols; x += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), cols - x);
          const Vec t = (Vec::loadu(row + x, n) * inv).tanh();
          (t * c).store(row + x, n);
          if (cap_grad) (one - t * t).store(cap_grad + r * ld + x, n);
        }
      }
    }
    if (!bias) return;
    // Row r of a row tile (query i = r) starts at diagonal qn - 1 - i = rows - 1 - r; of a
    // column tile (key j = r) at reversed diagonal kn - 1 - j = rows - 1 - r.
    for (int64_t r = 0; r < rows; ++r) {
      const T* b = bias + (rows - 1 - r);
      T* row = s + r * ld;
      at::vec::map2([](Vec a, Vec c) { return a + c; }, row, row, b, cols);
    }
  }

  // z = keep_scale where element (query q_row0 + i, key k_row0 + j) is kept, else 0: z[i * ld
  // + j] for row tiles, z[j * ld + i] for column tiles. Rows are those of the q and k tensors.
  template <bool kColumns>
  void dropout_scales(int64_t q_row0, int64_t qn, int64_t k_row0, int64_t kn, T* z, int64_t ld) {
    constexpr int kLanes = 16;
    const int64_t g0 = k_row0 / 4, g1 = (k_row0 + kn - 1) / 4 + 1, skip = k_row0 - 4 * g0;
    for (int64_t i = 0; i < qn; ++i) {
      const uint32_t query = static_cast<uint32_t>(q_row0 + i);
      for (int64_t g = g0; g < g1; g += kLanes) {
        uint32_t c[4][kLanes];
        for (int l = 0; l < kLanes; ++l) {
          c[0][l] = static_cast<uint32_t>(g + l);
          c[1][l] = query;
          c[2][l] = coords.head;
          c[3][l] = coords.batch;
        }
        philox_lanes<kLanes>(c, coords.seed_lo, coords.seed_hi);
        const int64_t lanes = std::min<int64_t>(kLanes, g1 - g);
        for (int64_t l = 0; l < lanes; ++l) {
          for (int w = 0; w < 4; ++w) words[(g - g0 + l) * 4 + w] = c[w][l];
        }
      }
      for (int64_t j = 0; j < kn; ++j) {
        const T keep = words[skip + j] >= threshold ? keep_scale : T(0);
        (kColumns ? z[j * ld + i] : z[i * ld + j]) = keep;
      }
    }
  }
};

// acc[t] += sum over the tile's diagonal t = j - i + qn - 1 of ds[i][j], for a row tile
// ds[qn x kn]: what the distance bias's gradient needs from a block pair.
template <typename T>
inline void add_diagonal_sums(int64_t qn, int64_t kn, const T* ds, int64_t ld, T* acc) {
  for (int64_t i = 0; i < qn; ++i) {
    T* a = acc + (qn - 1 - i);
    at::vec::map2([](Vectorized<T> x, Vectorized<T> y) { return x + y; }, a, a, ds + i * ld, kn);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
