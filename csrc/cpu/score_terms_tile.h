// The score terms (../score_terms.h) on the CPU kernels' tiles: one TileTerms per task holds
// the terms of its (sequence, head) and edits each block pair's scores between the product
// and the element mask; the dropout scales and the sums the bias gradients need are built
// tile by tile, in either orientation (attention_tile.h: row tiles s[qn x kn], column tiles
// s_t[kn x qn]).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "../score_terms.h"
#include "philox_lanes.h"
#include "tile_ops.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

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
  std::vector<T> columns;  // a row tile's dropout scales as a column tile

  TileTerms(const ScoreTerms& t, const Problem& problem)
      : terms(t), p(problem), diagonals(t.distance_bias() ? 2 * p.block_size : 0),
        columns(t.dropout() ? p.block_size * p.block_size : 0) {
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

  // Scores of a tile (rows x cols, leading dimension ld, either orientation) edited in place:
  // soft-capped, with cap_grad (when given, same layout) = d capped / d raw = 1 - tanh^2; then
  // the distance bias from distance_bias of the tile's orientation added. The element mask
  // comes after.
  void edit_scores(int64_t rows, int64_t cols, const T* bias, T* s, int64_t ld, T* cap_grad) const {
    using Vec = Vectorized<T>;
    if (softcap > 0) {
      const Vec c(softcap), inv(T(1) / softcap), one(T(1));
      for (int64_t r = 0; r < rows; ++r) {
        T* row = s + r * ld;
        for (int64_t x = 0; x < cols; x += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), cols - x);
          const Vec t = tanh_fast(Vec::loadu(row + x, n) * inv);
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

  // Dropout's scales, keep_scale where element (query q_row0 + i, key k_row0 + j) is kept, else
  // 0: column tiles (kColumns) z[j * ld + i] are multiplied by them in place, row tiles
  // z[i * ld + j] are set to them. Rows are those of the q and k tensors.
  template <bool kColumns>
  void dropout(int64_t q_row0, int64_t qn, int64_t k_row0, int64_t kn, T* z, int64_t ld) {
    if constexpr (kColumns) {
      keep_columns<true>(q_row0, qn, k_row0, kn, z, ld);
    } else {  // the bits run over queries: made as a column tile, then transposed
      keep_columns<false>(q_row0, qn, k_row0, kn, columns.data(), qn);
      for (int64_t i = 0; i < qn; ++i) {
        for (int64_t j = 0; j < kn; ++j) z[i * ld + j] = columns[j * qn + i];
      }
    }
  }

  // Column tile z[j * ld + i] (key j, query i) times dropout's scales (kMultiply), or set to
  // them. The Philox lanes take (key, 64-query group) blocks of kDropoutLanes lanes each;
  // whole groups inside the tile go 16 queries at a time, group edges element by element.
  template <bool kMultiply>
  void keep_columns(int64_t q_row0, int64_t qn, int64_t k_row0, int64_t kn, T* z, int64_t ld) {
    constexpr int kBlocksPerCall = kPhiloxLanes / kDropoutLanes;
    const int64_t g0 = q_row0 / kDropoutQueries, groups = (q_row0 + qn - 1) / kDropoutQueries + 1 - g0;
    const int64_t blocks = kn * groups;  // (key, group) pairs, key-major
    int64_t key = 0, group = 0;          // of the call's first block
    for (int64_t first = 0; first < blocks; first += kBlocksPerCall) {
      uint32_t group_lane[kBlocksPerCall], key_row[kBlocksPerCall], c[4][kPhiloxLanes];
      for (int b = 0, j = static_cast<int>(key), g = static_cast<int>(group); b < kBlocksPerCall; ++b) {
        group_lane[b] = static_cast<uint32_t>((g0 + g) * kDropoutLanes);
        key_row[b] = static_cast<uint32_t>(k_row0 + std::min<int64_t>(j, kn - 1));
        if (++g == groups) g = 0, ++j;
      }
      philox_blocks<kDropoutLanes>(group_lane, key_row, coords.head, coords.batch, coords.seed_lo,
                                   coords.seed_hi, c);
      for (int b = 0; b < kBlocksPerCall && first + b < blocks; ++b) {
        T* row = z + key * ld;
        const int64_t i0 = (g0 + group) * kDropoutQueries - q_row0;  // the group's first query
        if (kDropoutSixteen && std::is_same_v<T, float> && i0 >= 0 && i0 + kDropoutQueries <= qn) {
          for (int w = 0; w < 4; ++w) {
            dropout_sixteen<kMultiply>(&c[w][b * kDropoutLanes], threshold, static_cast<float>(keep_scale),
                                       reinterpret_cast<float*>(row + i0 + 16 * w));
          }
        } else {
          for (int r = 0; r < kDropoutQueries / kDropoutLanes; ++r) {  // run r: half r % 2 of word r / 2
            for (int l = 0; l < kDropoutLanes; ++l) {
              const int64_t i = i0 + r * kDropoutLanes + l;
              if (i < 0 || i >= qn) continue;
              const uint32_t bits = (c[r / 2][b * kDropoutLanes + l] >> (16 * (r % 2))) & 0xFFFF;
              const T scale = bits >= threshold ? keep_scale : T(0);
              row[i] = kMultiply ? row[i] * scale : scale;
            }
          }
        }
        if (++group == groups) group = 0, ++key;
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
