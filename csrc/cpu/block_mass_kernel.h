// Attention probability mass per computed block pair on the CPU: one task per (batch, head,
// query block) walks its row list as the forward does, recomputes S = (scale Q) K^T with the
// element rules and sums P = exp(S - lse) over the block, reusing the forward's lse. kPairs
// computes S as the forward does with it.
#pragma once

#include <ATen/OpMathType.h>

#include <limits>
#include <vector>

#include "attention_tile.h"
#include "parallel.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, bool kPairs = false>
void block_mass_kernel(const BlockMassParams& m) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = m.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  const auto* lse = static_cast<const T*>(m.lse);
  const auto cost = [&](int64_t task) { return row_task_cost(p, m.rows, task); };
  const auto section = [&](int64_t task) { return row_task_section(p, task, sizeof(scalar_t)); };
  run_parallel_longest_first(num_row_tasks(p), cost, [&](const NextTask& next) {
    ColumnScorer<T, kPairs> scorer(bs, dim);
    std::vector<T> s_t(bs * bs), shift(bs), sum(bs);
    for (int64_t task = next(); task >= 0; task = next()) {
      const RowTask row = row_task(p, task);
      const Sequence& seq = row.seq;
      const int64_t batch = seq.batch, head = row.head, qb = row.qb;
      const int64_t kv_head = head / p.group(), q0 = qb * bs, qn = std::min(bs, seq.q_len - q0);
      scorer.load_queries(p, qn, operand_rows<scalar_t>(m.q, batch, head, seq.q_begin + q0), m.q.row_stride);
      const int64_t row0 = p.q_row(seq, head, q0);
      for (int64_t i = 0; i < qn; ++i) {
        // A query that saw no key (lse = -inf) carries no mass: exp(S - inf) = 0.
        const T l = lse[row0 + i];
        shift[i] = l == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::infinity() : l;
      }
      float* out = m.mass + ((batch * p.heads + head) * p.q_blocks + qb) * p.k_blocks;
      for_each_block_pair<true>(p, m.rows, row.list(p), seq, qb, [&](const BlockPair& blk) {
        scorer.scores(p, seq, blk, operand_rows<scalar_t>(m.k, batch, kv_head, seq.k_begin + blk.k0),
                      m.k.row_stride, s_t.data());
        exp_shift_columns(s_t.data(), blk.kn, qn, shift.data(), sum.data());
        T total = 0;
        for (int64_t i = 0; i < qn; ++i) total += sum[i];
        out[blk.k0 / bs] = static_cast<float>(total);
      });
    }
  }, section);
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
