// Block-sparse attention backward on the CPU, deterministic and free of atomics:
//   1. delta = rowsum(dO * O) - dlse;
//   2. one task per range of key blocks of a (sequence, kv head) walks the columns of its
//      blocks (for every query head of the GQA group) with row tiles [qn x kn]: it recomputes
//      P from the saved lse once per block pair and does the five tile products, finishing dK
//      and dV of its blocks and adding dS K to its own partial sum of dQ;
//   3. dQ = scale * the partial sums, added in range order.
// Each task converts or transposes only what it keeps for a whole column (K, K^T and V^T).
// With kPairs (bfloat16 inputs where the processor multiplies them natively) the five
// products run on bfloat16 pairs (pair_products.h), P and dS rounded to bfloat16, and the
// scale goes on dK at the end instead of on Q.
// Score terms (score_terms_tile.h): the tiles are edited as the forward edited them, dropout
// scales P for dV and dP for dS, the soft cap's derivative multiplies dS before dK and dQ, and
// the gradients of the sinks (from delta) and of the distance bias (from dS summed by
// distance, per task, added in task order) need no atomics either.
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "attention_tile.h"
#include "pair_products.h"
#include "parallel.h"
#include "score_terms_tile.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

// delta = rowsum(dO * O) - dlse, and with sinks their gradient: d lse / d sink = exp(sink -
// lse) = P(sink), so grad_sink = -sum over the head's rows of P(sink) delta.
template <typename scalar_t>
void compute_delta(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const auto* grad_lse = static_cast<const T*>(g.grad_lse);
  const auto* lse = static_cast<const T*>(g.lse);
  const auto* sinks = static_cast<const T*>(g.terms.sinks);
  auto* delta = static_cast<T*>(g.delta);
  std::vector<T> sink_parts(sinks ? p.batch * p.heads : 0, T(0));
  run_parallel(p.batch * p.heads, [&](const NextTask& next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t batch = task / p.heads, head = task % p.heads;
      const scalar_t* o = operand_rows<scalar_t>(g.out, batch, head, 0);
      const scalar_t* d_o = operand_rows<scalar_t>(g.grad_out, batch, head, 0);
      for (int64_t i = 0; i < p.q_len; ++i) {
        T sum = 0;
        for (int64_t j = 0; j < p.head_dim; ++j) {
          sum += static_cast<T>(o[i * g.out.row_stride + j]) *
                 static_cast<T>(d_o[i * g.grad_out.row_stride + j]);
        }
        const int64_t row = task * p.q_len + i;
        delta[row] = grad_lse ? sum - grad_lse[row] : sum;
        const T sink = sinks ? sinks[head] : T(0);
        if (sinks && sink != -std::numeric_limits<T>::infinity()) {
          sink_parts[task] -= std::exp(sink - lse[row]) * delta[row];
        }
      }
    }
  });
  if (!sinks) return;
  auto* grad_sinks = static_cast<T*>(g.grad_sinks);
  for (int64_t head = 0; head < p.heads; ++head) {
    T sum = 0;
    for (int64_t batch = 0; batch < p.batch; ++batch) sum += sink_parts[batch * p.heads + head];
    grad_sinks[head] = sum;
  }
}

// A task of the gradient pass: key blocks [kb_begin, kb_end) of one (sequence, kv head). Its
// dQ terms go to partial sum `part` of dQ.
struct KeyRange {
  int64_t s, kv_head, kb_begin, kb_end, part, cost;
};

// Tasks the gradient pass wants at least: the key blocks of each (sequence, kv head) are cut
// into this many ranges over the (sequence, kv head) pairs, of about equal cost, as far as
// the partial sums of dQ fit in kMaxPartialBytes (one part always does). Both are constants,
// never the thread count, so that dQ is the same on any number of threads.
constexpr int64_t kMinGradTasks = 16;
constexpr int64_t kMaxPartialBytes = int64_t{512} << 20;

inline int64_t grad_parts(const Problem& p, int64_t part_bytes) {
  const int64_t units = p.sequences() * p.kv_heads;
  const int64_t wanted = (kMinGradTasks + units - 1) / units;
  return std::max<int64_t>(1, std::min(wanted, kMaxPartialBytes / std::max<int64_t>(part_bytes, 1)));
}

// First block of sequence s among the query (rows) or key blocks of all sequences.
inline int64_t first_block(const Problem& p, int64_t s, bool rows) {
  if (p.packed()) return (rows ? p.q_block_starts : p.k_block_starts)[s];
  return s * (rows ? p.q_blocks : p.k_blocks);
}

inline std::vector<KeyRange> key_ranges(const Problem& p, const BlockLists& cols, int64_t parts) {
  std::vector<KeyRange> ranges;
  std::vector<int64_t> cost;
  for (int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
    for (int64_t s = 0; s < p.sequences(); ++s) {
      const int64_t blocks = first_block(p, s + 1, false) - first_block(p, s, false);
      cost.resize(blocks);
      int64_t total = 0;
      for (int64_t kb = 0; kb < blocks; ++kb) total += cost[kb] = column_cost(p, cols, s, kv_head, kb);
      // Range `part` ends where the running cost reaches (part + 1) / parts of the total.
      int64_t begin = 0, done = 0, part = 0;
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int64_t before = done;
        done += cost[kb];
        if (done * parts >= (part + 1) * total || kb + 1 == blocks) {
          ranges.push_back({s, kv_head, begin, kb + 1, part, done - before});
          begin = kb + 1;
          ++part;
        }
      }
    }
  }
  return ranges;
}

// dS summed by distance (key - query - offset) per task, for the distance bias's gradient:
// range r's query heads each own `size[r]` sums from distance `first[r]` (its first key
// against the sequence's last query) on, at data + start[r] + head in group * size[r].
template <typename T>
struct DistanceSums {
  std::vector<int64_t> start, first, size;
  std::vector<T> data;

  DistanceSums(const Problem& p, const std::vector<KeyRange>& ranges, bool wanted) {
    if (!wanted) return;
    int64_t total = 0;
    for (const KeyRange& r : ranges) {
      const Sequence seq = p.sequence(r.s);
      const int64_t k0 = r.kb_begin * p.block_size, k1 = std::min(r.kb_end * p.block_size, seq.k_len);
      start.push_back(total);
      first.push_back(k0 - (seq.q_len - 1) - seq.window.offset);
      size.push_back(seq.q_len + (k1 - k0) - 1);
      total += p.group() * size.back();
    }
    data.assign(total, T(0));
  }

  // Where block pair blk of range r and query head `head` adds its diagonal sums.
  T* at(const Problem& p, int64_t r, int64_t head, const Sequence& seq, const BlockPair& blk) {
    if (data.empty()) return nullptr;
    const int64_t d0 = TileTerms<T>::first_distance(seq, blk.q0, blk.qn, blk.k0);
    return data.data() + start[r] + (head % p.group()) * size[r] + (d0 - first[r]);
  }

  // The gradients of the position table and the ALiBi slopes, in range order.
  void add_into(const Problem& p, const ScoreTerms& terms, const std::vector<KeyRange>& ranges,
                T* grad_table, T* grad_slopes) const {
    if (data.empty()) return;
    for (size_t r = 0; r < ranges.size(); ++r) {
      const Sequence seq = p.sequence(ranges[r].s);
      for (int64_t h = 0; h < p.group(); ++h) {
        const int64_t head = ranges[r].kv_head * p.group() + h;
        const T* sums = data.data() + start[r] + h * size[r];
        for (int64_t e = 0; e < size[r]; ++e) {
          const int64_t d = first[r] + e;
          if (grad_table) grad_table[head * terms.num_buckets + terms.position_buckets[d + p.k_len - 1]] += sums[e];
          if (grad_slopes) {
            grad_slopes[(terms.alibi_batch > 1 ? seq.batch : 0) * p.heads + head] -= static_cast<T>(d < 0 ? -d : d) * sums[e];
          }
        }
      }
    }
  }
};

template <typename scalar_t, bool kPairs = false>
void backward_kernel(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  compute_delta<scalar_t>(g);
  const Problem& p = g.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  const auto* lse = static_cast<const T*>(g.lse);
  const auto* delta = static_cast<const T*>(g.delta);
  const int64_t dq_size = p.batch * p.heads * p.q_len * dim;
  const int64_t parts = grad_parts(p, dq_size * static_cast<int64_t>(sizeof(T))), row_blocks = num_row_tasks(p);
  // Partial sums of dQ (unscaled), one per range index; written[part * row_blocks + task]
  // says whether that part of row task `task`'s block holds anything. Only the task that owns
  // a part of a block writes it, so neither needs zeroing beforehand or a lock.
  std::unique_ptr<T[]> dq_parts(new T[parts * dq_size]);
  std::vector<uint8_t> written(parts * row_blocks, 0);
  const std::vector<KeyRange> ranges = key_ranges(p, g.cols, parts);
  DistanceSums<T> distance_sums(p, ranges, g.terms.distance_bias());

  const auto cost = [&](int64_t task) { return ranges[task].cost; };
  // A column task reads Q and dO of its kv head's query heads and adds to their dQ partials.
  const int64_t group_bytes = p.batch * p.q_len * dim * p.group() * (2 * sizeof(scalar_t) + sizeof(T));
  const auto section = [&](int64_t task) { return kv_head_section(ranges[task].kv_head, group_bytes); };
  run_parallel_longest_first(static_cast<int64_t>(ranges.size()), cost, [&](const NextTask& next) {
    std::vector<T> k_t(dim * bs), v_t(dim * bs), k_rows(bs * dim), q_rows(bs * dim),
        do_rows(bs * dim), s(bs * bs), dp(bs * bs), grad_k(bs * dim), grad_v(bs * dim);
    // With kPairs: K^T, V^T and K once per column; Q and dO (both ways), P and dS per pair.
    const int64_t d2 = pairs_of(dim), b2 = pairs_of(bs);
    std::vector<Pair> k_t_pairs(kPairs ? d2 * bs : 0), v_t_pairs(kPairs ? d2 * bs : 0),
        k_row_pairs(kPairs ? b2 * dim : 0), q_pairs(kPairs ? bs * d2 : 0), q_row_pairs(kPairs ? b2 * dim : 0),
        do_pairs(kPairs ? bs * d2 : 0), do_row_pairs(kPairs ? b2 * dim : 0), tile_pairs(kPairs ? bs * b2 : 0);
    // The scale goes on Q in the accumulation type, on dK with the pairs.
    const T q_scale = kPairs ? T(1) : static_cast<T>(p.scale), k_scale = kPairs ? static_cast<T>(p.scale) : T(1);
    TileTerms<T> terms(g.terms, p);
    // Dropout scales, P times them, and the soft cap's derivative, as row tiles.
    std::vector<T> keep(g.terms.dropout() ? bs * bs : 0), kept_p(keep.size()), cap_grad(g.terms.softcap > 0 ? bs * bs : 0);
    for (int64_t task = next(); task >= 0; task = next()) {
      const KeyRange& range = ranges[task];
      const Sequence seq = p.sequence(range.s);
      const int64_t batch = seq.batch, kv_head = range.kv_head;
      T* dq_part = dq_parts.get() + range.part * dq_size;
      uint8_t* dq_written = written.data() + range.part * row_blocks;
      for (int64_t kb = range.kb_begin; kb < range.kb_end; ++kb) {
        const int64_t k0 = kb * bs, kn = std::min(bs, seq.k_len - k0);
        std::fill(grad_k.begin(), grad_k.end(), T(0));
        std::fill(grad_v.begin(), grad_v.end(), T(0));
        // K^T and V^T for the row tiles, K for dS K, kept for every query block of the column.
        // Without pairs the scale goes on Q, as in the forward pass: S must round exactly as it
        // did there, or exp(S - lse) drifts when logits are large.
        const scalar_t* k_src = operand_rows<scalar_t>(g.k, batch, kv_head, seq.k_begin + k0);
        const scalar_t* v_src = operand_rows<scalar_t>(g.v, batch, kv_head, seq.k_begin + k0);
        load_rows_transposed(kn, dim, k_src, g.k.row_stride, T(1), k_t.data(), kn);
        load_rows_transposed(kn, dim, v_src, g.v.row_stride, T(1), v_t.data(), kn);
        const RowsView<T> k = rows_as(k_src, g.k.row_stride, kn, dim, k_rows.data());
        const bool kv_finite = all_finite(v_t.data(), kn, dim, kn) && all_finite(k_t.data(), kn, dim, kn);
        const bool kv_pairs = kPairs && !has_subnormal(kn, dim, k_src, g.k.row_stride) &&
                              !has_subnormal(kn, dim, v_src, g.v.row_stride);
        if constexpr (kPairs) {
          pack_pairs_transposed(kn, dim, k_src, g.k.row_stride, k_t_pairs.data());
          pack_pairs_transposed(kn, dim, v_src, g.v.row_stride, v_t_pairs.data());
          pack_row_pairs(kn, dim, k_src, g.k.row_stride, k_row_pairs.data());
        }
        for (int64_t head = kv_head * p.group(); head < (kv_head + 1) * p.group(); ++head) {
          const int64_t list = p.list(range.s, head, kb, p.k_blocks);
          terms.set_head(batch, head);
          for_each_block_pair<false>(p, g.cols, list, seq, kb, [&](const BlockPair& blk) {
            const int64_t qn = blk.qn, row0 = p.q_row(seq, head, blk.q0);
            const int64_t row_block = head * p.total_q_blocks() + first_block(p, range.s, true) + blk.q0 / bs;
            T* grad_q = dq_part + row0 * dim;
            if (!dq_written[row_block]) std::fill(grad_q, grad_q + qn * dim, T(0));
            dq_written[row_block] = 1;
            const scalar_t* q_src = operand_rows<scalar_t>(g.q, batch, head, seq.q_begin + blk.q0);
            const scalar_t* do_src = operand_rows<scalar_t>(g.grad_out, batch, head, seq.q_begin + blk.q0);
            // Q and dO in the accumulation type, which the pairs need only for masked tiles.
            const bool pairs = kv_pairs && !has_subnormal(qn, dim, q_src, g.q.row_stride) &&
                               !has_subnormal(qn, dim, do_src, g.grad_out.row_stride);
            RowsView<T> q{q_rows.data(), dim}, d_o{nullptr, 0};
            if (!pairs || blk.masked) {
              load_rows(qn, dim, q_src, g.q.row_stride, q_scale, q_rows.data());
              d_o = rows_as(do_src, g.grad_out.row_stride, qn, dim, do_rows.data());
            }
            // P = exp(S - lse) per row, S = (scale Q) K^T edited by the terms; rows that saw no
            // key get 0.
            const T* bias = terms.template distance_bias<false>(seq, blk.q0, qn, blk.k0, kn);
            T* cap = cap_grad.empty() ? nullptr : cap_grad.data();
            const auto edit = [&](T* tile, int64_t ld) { terms.edit_scores(qn, kn, bias, tile, ld, cap); };
            if constexpr (kPairs) {
              pack_pairs(qn, dim, q_src, g.q.row_stride, q_pairs.data());
              row_scores(p, seq, blk, q_pairs.data(), k_t_pairs.data(), s.data(), edit);
            } else {
              row_scores(p, seq, blk, q, k_t.data(), s.data(), edit);
            }
            if (!keep.empty()) {
              terms.template dropout<false>(seq.q_begin + blk.q0, qn, seq.k_begin + k0, kn, keep.data(), kn);
            }
            const TileGradTerms<T> tile_terms{keep.empty() ? nullptr : keep.data(), cap,
                                              distance_sums.at(p, task, head, seq, blk)};
            if (blk.masked && !(kv_finite && all_finite(q.data, q.ld, qn, dim) &&
                                all_finite(d_o.data, d_o.ld, qn, dim) &&
                                row_stats_finite(lse + row0, delta + row0, qn))) {
              return grad_visible(qn, kn, dim, s.data(), lse + row0, delta + row0, q, d_o, k,
                                  v_t.data(), grad_q, grad_k.data(), grad_v.data(), tile_terms);
            }
            for (int64_t i = 0; i < qn; ++i) {
              T* row = s.data() + i * kn;
              if (std::isinf(lse[row0 + i])) {
                std::fill(row, row + kn, T(0));
              } else {
                exp_shift_sum(row, kn, lse[row0 + i]);
              }
            }
            // dV += (P z)^T dO; dS = P (z dO V^T - delta), times the cap's derivative; dK += dS^T Q;
            // dQ += dS K.
            // dst = x * y over the tile.
            const auto product = [&](T* dst, const T* x, const T* y) {
              at::vec::map2([](Vectorized<T> a, Vectorized<T> b) { return a * b; }, dst, x, y, qn * kn);
            };
            const T* probs = s.data();
            if (!keep.empty()) {
              product(kept_p.data(), s.data(), keep.data());
              probs = kept_p.data();
            }
            const auto softmax_grad = [&] {
              if (!keep.empty()) product(dp.data(), dp.data(), keep.data());
              for (int64_t i = 0; i < qn; ++i) {
                softmax_grad_row(s.data() + i * kn, dp.data() + i * kn, kn, delta[row0 + i]);
              }
              if (tile_terms.diagonal_sums) add_diagonal_sums(qn, kn, dp.data(), kn, tile_terms.diagonal_sums);
              if (cap) product(dp.data(), dp.data(), cap);
            };
            if (!pairs) {
              // Sums over what the window hides (P = dS = 0) left out; dP is whole, so that
              // dS = 0 there.
              const SeenColumns<true> seen_queries{seq, blk};
              const SeenColumns<false> seen_keys{seq, blk};
              gemm<true, true>(kn, dim, qn, probs, kn, d_o.data, d_o.ld, grad_v.data(), dim, seen_queries);
              gemm<false>(qn, kn, dim, d_o.data, d_o.ld, v_t.data(), kn, dp.data(), kn);
              softmax_grad();
              gemm<true, true>(kn, dim, qn, dp.data(), kn, q.data, q.ld, grad_k.data(), dim, seen_queries);
              gemm<true>(qn, dim, kn, dp.data(), kn, k.data, k.ld, grad_q, dim, seen_keys);
            } else if constexpr (kPairs) {
              const int64_t q2 = pairs_of(qn), k2 = pairs_of(kn);
              pack_pairs(qn, dim, do_src, g.grad_out.row_stride, do_pairs.data());
              pack_row_pairs(qn, dim, do_src, g.grad_out.row_stride, do_row_pairs.data());
              pack_row_pairs(qn, dim, q_src, g.q.row_stride, q_row_pairs.data());
              pack_row_pairs(qn, kn, probs, kn, tile_pairs.data());
              gemm_pairs<true, true>(kn, dim, q2, tile_pairs.data(), kn, do_row_pairs.data(), dim, grad_v.data(), dim);
              gemm_pairs<false>(qn, kn, d2, do_pairs.data(), d2, v_t_pairs.data(), kn, dp.data(), kn);
              softmax_grad();
              pack_row_pairs(qn, kn, dp.data(), kn, tile_pairs.data());
              gemm_pairs<true, true>(kn, dim, q2, tile_pairs.data(), kn, q_row_pairs.data(), dim, grad_k.data(), dim);
              pack_pairs(qn, kn, dp.data(), kn, tile_pairs.data());
              gemm_pairs<true>(qn, dim, k2, tile_pairs.data(), k2, k_row_pairs.data(), dim, grad_q, dim);
            }
          });
        }
        const int64_t out0 = p.k_row(seq, kv_head, k0);
        store_rows(kn, dim, grad_k.data(), k_scale, static_cast<scalar_t*>(g.grad_k) + out0 * dim, dim);
        store_rows(kn, dim, grad_v.data(), T(1), static_cast<scalar_t*>(g.grad_v) + out0 * dim, dim);
      }
    }
  }, section);
  distance_sums.add_into(p, g.terms, ranges, static_cast<T*>(g.grad_position_bias),
                         static_cast<T*>(g.grad_alibi_slopes));

  // dQ = scale * (part 0 + part 1 + ...), over the parts that hold anything.
  run_parallel(row_blocks, [&](const NextTask& next) {
    std::vector<T> sum(bs * dim);
    for (int64_t task = next(); task >= 0; task = next()) {
      const RowTask row = row_task(p, task);
      const int64_t q0 = row.qb * bs, qn = std::min(bs, row.seq.q_len - q0);
      const int64_t row0 = p.q_row(row.seq, row.head, q0);
      std::fill_n(sum.begin(), qn * dim, T(0));
      for (int64_t part = 0; part < parts; ++part) {
        if (!written[part * row_blocks + task]) continue;
        const T* src = dq_parts.get() + part * dq_size + row0 * dim;
        for (int64_t e = 0; e < qn * dim; ++e) sum[e] += src[e];
      }
      store_rows(qn, dim, sum.data(), static_cast<T>(p.scale),
                 static_cast<scalar_t*>(g.grad_q) + row0 * dim, dim);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
