// Block-sparse attention forward on the CPU, FlashAttention-2 style: one task per
// (sequence, head, query block) walks its row of the layout with an online softmax, keeping
// the output accumulator in the accumulation type and writing out and lse once. With kPairs
// (bfloat16 inputs where the processor multiplies them natively) the two tile products run on
// bfloat16 pairs (pair_products.h), P rounded to bfloat16 as the second one reads it.
// Score terms (score_terms_tile.h) edit each tile before the element mask; dropout scales P
// after the row statistics took it, and a sink joins the denominator at the end.
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention_tile.h"
#include "pair_products.h"
#include "parallel.h"
#include "score_terms_tile.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, bool kPairs = false>
void forward_kernel(const ForwardParams& f) {
  using T = at::opmath_type<scalar_t>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Problem& p = f.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  auto* out = static_cast<scalar_t*>(f.out);
  auto* lse = static_cast<T*>(f.lse);

  const auto cost = [&](int64_t task) { return row_task_cost(p, f.rows, task); };
  const auto section = [&](int64_t task) { return row_task_section(p, task, sizeof(scalar_t)); };
  run_parallel_longest_first(num_row_tasks(p), cost, [&](const NextTask& next) {
    // s_t is a column tile [kn x qn] (see attention_tile.h); m, l, shift, correction and
    // block_sum are per query.
    ColumnScorer<T, kPairs> scorer(bs, dim);
    std::vector<T> v_rows(bs * dim), s_t(bs * bs), acc(bs * dim), m(bs), l(bs), new_max(bs),
        shift(bs), block_sum(bs), correction(bs);
    std::vector<Pair> v_pairs(kPairs ? pairs_of(bs) * dim : 0), p_pairs(kPairs ? pairs_of(bs) * bs : 0);
    TileTerms<T> terms(f.terms, p);
    for (int64_t task = next(); task >= 0; task = next()) {
      const RowTask row = row_task(p, task);
      const Sequence& seq = row.seq;
      const int64_t batch = seq.batch, head = row.head, qb = row.qb;
      const int64_t kv_head = head / p.group(), q0 = qb * bs, qn = std::min(bs, seq.q_len - q0);
      scorer.load_queries(p, qn, operand_rows<scalar_t>(f.q, batch, head, seq.q_begin + q0), f.q.row_stride);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), T(0));
      terms.set_head(batch, head);

      for_each_block_pair<true>(p, f.rows, row.list(p), seq, qb, [&](const BlockPair& blk) {
        const int64_t kn = blk.kn;
        const T* bias = terms.template distance_bias<true>(seq, q0, qn, blk.k0, kn);
        const auto edit = [&](T* s, int64_t ld) { terms.edit_scores(kn, qn, bias, s, ld, nullptr); };
        scorer.scores(p, seq, blk, operand_rows<scalar_t>(f.k, batch, kv_head, seq.k_begin + blk.k0),
                      f.k.row_stride, s_t.data(), edit);
        const scalar_t* v_src = operand_rows<scalar_t>(f.v, batch, kv_head, seq.k_begin + blk.k0);
        // Online softmax, vectorised across queries: new running maximum, P^T = exp(S^T - max)
        // (a query that has seen nothing yet shifts by 0 and gets exp(-inf) = 0), and the
        // rescaling of what was accumulated under the old maximum.
        std::copy_n(m.begin(), qn, new_max.begin());
        for (int64_t j = 0; j < kn; ++j) max_into(new_max.data(), s_t.data() + j * qn, qn);
        for (int64_t i = 0; i < qn; ++i) shift[i] = new_max[i] == kNegInf ? T(0) : new_max[i];
        std::fill_n(block_sum.begin(), qn, T(0));
        for (int64_t j = 0; j < kn; ++j) {
          exp_shift_columns(s_t.data() + j * qn, shift.data(), block_sum.data(), qn);
        }
        online_softmax_step(m.data(), new_max.data(), l.data(), block_sum.data(), correction.data(), qn);
        for (int64_t i = 0; i < qn; ++i) {
          if (correction[i] != T(1)) scale_row(acc.data() + i * dim, dim, correction[i]);
        }
        if (f.terms.dropout()) {  // the sums above took P whole
          terms.template dropout<true>(seq.q_begin + q0, qn, seq.k_begin + blk.k0, kn, s_t.data(), qn);
        }
        // O += P V, with P read from its transposed tile. A masked tile whose V holds inf or NaN
        // takes its products pair by pair, with V in the accumulation type.
        const bool pairs = kPairs && !has_subnormal(kn, dim, v_src, f.v.row_stride);
        const RowsView<T> v = pairs && !blk.masked ? RowsView<T>{nullptr, 0}
                                                   : rows_as(v_src, f.v.row_stride, kn, dim, v_rows.data());
        if (blk.masked && !all_finite(v.data, v.ld, kn, dim)) {
          add_visible_products(qn, kn, dim, s_t.data(), v.data, v.ld, acc.data());
        } else if (!pairs) {
          gemm<true, true>(qn, dim, kn, s_t.data(), qn, v.data, v.ld, acc.data(), dim,
                           SeenColumns<false>{seq, blk});
        } else if constexpr (kPairs) {
          pack_row_pairs(kn, dim, v_src, f.v.row_stride, v_pairs.data());
          pack_row_pairs(kn, qn, s_t.data(), qn, p_pairs.data());
          gemm_pairs<true, true>(qn, dim, pairs_of(kn), p_pairs.data(), qn, v_pairs.data(), dim, acc.data(), dim);
        }
      });

      const int64_t row0 = p.q_row(seq, head, q0);
      for (int64_t i = 0; i < qn; ++i) {
        // A row that saw no key returns 0 with lse = -inf (the sink's logit with a sink); a NaN
        // sum (NaN inputs) is not "no key": that row returns NaN.
        const bool seen = !(l[i] == T(0));
        T mul = seen ? T(1) / l[i] : T(0);
        if (!f.terms.sinks) {
          lse[row0 + i] = seen ? m[i] + std::log(l[i]) : kNegInf;
        } else if (!seen) {
          lse[row0 + i] = terms.sink;
        } else {  // lse = log(l e^m + e^sink), shifted by the larger of m and the sink
          const T top = std::max(m[i], terms.sink);
          lse[row0 + i] = top + std::log(l[i] * std::exp(m[i] - top) + std::exp(terms.sink - top));
          mul = std::exp(m[i] - lse[row0 + i]);
        }
        store_rows(1, dim, acc.data() + i * dim, mul, out + (row0 + i) * dim, dim);
      }
    }
  }, section);
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
