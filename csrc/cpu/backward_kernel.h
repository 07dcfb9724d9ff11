// Block-sparse attention backward on the CPU, deterministic and free of atomics:
//   1. delta = rowsum(dO * O) - dlse;
//   2. one task per (sequence, kv head, key block) walks its column of the layout (for every
//      query head of the GQA group) and accumulates dK and dV, with row tiles [qn x kn];
//   3. one task per (sequence, head, query block) walks its row and accumulates dQ, with column
//      tiles [kn x qn] (see attention_tile.h).
// P is recomputed from the saved lse in both passes. Each task transposes only what it
// keeps for all of its blocks (K and V in pass 2, Q and dO in pass 3).
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention_tile.h"
#include "parallel.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
void compute_delta(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const auto* grad_lse = static_cast<const T*>(g.grad_lse);
  auto* delta = static_cast<T*>(g.delta);
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
      }
    }
  });
}

template <typename scalar_t>
void grad_key_value_kernel(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  const auto* lse = static_cast<const T*>(g.lse);
  const auto* delta = static_cast<const T*>(g.delta);
  const auto cost = [&](int64_t task) { return column_task_cost(p, g.cols, task); };
  run_parallel_longest_first(num_column_tasks(p), cost, [&](const NextTask& next) {
    std::vector<T> k_t(dim * bs), v_t(dim * bs), q_rows(bs * dim), do_rows(bs * dim),
        s(bs * bs), dp(bs * bs), grad_k(bs * dim), grad_v(bs * dim);
    for (int64_t task = next(); task >= 0; task = next()) {
      const ColumnTask column = column_task(p, task);
      const Sequence& seq = column.seq;
      const int64_t batch = seq.batch, kv_head = column.kv_head, kb = column.kb;
      const int64_t k0 = kb * bs, kn = std::min(bs, seq.k_len - k0);
      std::fill(grad_k.begin(), grad_k.end(), T(0));
      std::fill(grad_v.begin(), grad_v.end(), T(0));
      // K^T and V^T, kept for every query block of the column. The scale goes on Q, as in the
      // forward pass: S must round exactly as it did there, or exp(S - lse) drifts when logits
      // are large.
      load_rows_transposed(kn, dim, operand_rows<scalar_t>(g.k, batch, kv_head, seq.k_begin + k0), g.k.row_stride,
                           T(1), k_t.data(), kn);
      load_rows_transposed(kn, dim, operand_rows<scalar_t>(g.v, batch, kv_head, seq.k_begin + k0), g.v.row_stride,
                           T(1), v_t.data(), kn);
      const bool v_finite = all_finite(v_t.data(), kn, dim, kn);
      for (int64_t head = kv_head * p.group(); head < (kv_head + 1) * p.group(); ++head) {
        for_each_block_pair<false>(p, g.cols, column.list(p, head), seq, kb, [&](const BlockPair& blk) {
          const int64_t qn = blk.qn, row0 = p.q_row(seq, head, blk.q0);
          load_rows(qn, dim, operand_rows<scalar_t>(g.q, batch, head, seq.q_begin + blk.q0), g.q.row_stride,
                    static_cast<T>(p.scale), q_rows.data());
          const RowsView<T> q{q_rows.data(), dim};  // scale Q
          const RowsView<T> d_o =
              operand_block<scalar_t>(g.grad_out, batch, head, seq.q_begin + blk.q0, qn, dim, do_rows.data());
          // P = exp((scale Q) K^T - lse) per row; rows that saw no key get 0.
          row_scores(p, seq, blk, q, k_t.data(), s.data());
          if (blk.masked && !(v_finite && all_finite(q.data, q.ld, qn, dim) &&
                              all_finite(d_o.data, d_o.ld, qn, dim) &&
                              row_stats_finite(lse + row0, delta + row0, qn))) {
            return grad_key_value_visible(qn, kn, dim, s.data(), lse + row0, delta + row0, q, d_o,
                                          v_t.data(), grad_k.data(), grad_v.data());
          }
          for (int64_t i = 0; i < qn; ++i) {
            T* row = s.data() + i * kn;
            if (std::isinf(lse[row0 + i])) {
              std::fill(row, row + kn, T(0));
            } else {
              exp_shift_sum(row, kn, lse[row0 + i]);
            }
          }
          // dV += P^T dO; dS = P (dO V^T - delta); dK += dS^T (scale Q).
          gemm<true, true>(kn, dim, qn, s.data(), kn, d_o.data, d_o.ld, grad_v.data(), dim);
          gemm<false>(qn, kn, dim, d_o.data, d_o.ld, v_t.data(), kn, dp.data(), kn);
          for (int64_t i = 0; i < qn; ++i) {
            softmax_grad_row(s.data() + i * kn, dp.data() + i * kn, kn, delta[row0 + i]);
          }
          gemm<true, true>(kn, dim, qn, dp.data(), kn, q.data, q.ld, grad_k.data(), dim);
        });
      }
      const int64_t out0 = p.k_row(seq, kv_head, k0);
      store_rows(kn, dim, grad_k.data(), T(1),
                 static_cast<scalar_t*>(g.grad_k) + out0 * dim, dim);
      store_rows(kn, dim, grad_v.data(), T(1), static_cast<scalar_t*>(g.grad_v) + out0 * dim, dim);
    }
  });
}

template <typename scalar_t>
void grad_query_kernel(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  const auto cost = [&](int64_t task) { return row_task_cost(p, g.rows, task); };
  run_parallel_longest_first(num_row_tasks(p), cost, [&](const NextTask& next) {
    std::vector<T> q_t(dim * bs), do_t(dim * bs), k_rows(bs * dim), v_rows(bs * dim),
        s_t(bs * bs), dp_t(bs * bs), shift(bs), delta(bs), grad_q(bs * dim);
    for (int64_t task = next(); task >= 0; task = next()) {
      const RowTask row = row_task(p, task);
      const Sequence& seq = row.seq;
      const int64_t batch = seq.batch, head = row.head, qb = row.qb;
      const int64_t kv_head = head / p.group(), q0 = qb * bs, qn = std::min(bs, seq.q_len - q0);
      const int64_t row0 = p.q_row(seq, head, q0);
      std::fill(grad_q.begin(), grad_q.end(), T(0));
      // (scale Q)^T and dO^T, kept for every key block of the row; a query that saw no key
      // shifts by +inf so that its probabilities are exp(-inf) = 0.
      load_rows_transposed(qn, dim, operand_rows<scalar_t>(g.q, batch, head, seq.q_begin + q0), g.q.row_stride,
                           static_cast<T>(p.scale), q_t.data(), qn);
      load_rows_transposed(qn, dim, operand_rows<scalar_t>(g.grad_out, batch, head, seq.q_begin + q0),
                           g.grad_out.row_stride, T(1), do_t.data(), qn);
      const bool do_finite = all_finite(do_t.data(), qn, dim, qn);
      for (int64_t i = 0; i < qn; ++i) {
        const T lse = static_cast<const T*>(g.lse)[row0 + i];
        shift[i] = std::isinf(lse) ? std::numeric_limits<T>::infinity() : lse;
        delta[i] = static_cast<const T*>(g.delta)[row0 + i];
      }
      for_each_block_pair<true>(p, g.rows, row.list(p), seq, qb, [&](const BlockPair& blk) {
        const int64_t kn = blk.kn;
        const RowsView<T> k = operand_block<scalar_t>(g.k, batch, kv_head, seq.k_begin + blk.k0, kn, dim, k_rows.data());
        const RowsView<T> v = operand_block<scalar_t>(g.v, batch, kv_head, seq.k_begin + blk.k0, kn, dim, v_rows.data());
        // P^T = exp(K (scale Q)^T - lse); dS^T = P^T (V dO^T - delta); dQ += dS K.
        column_scores(p, seq, blk, k, q_t.data(), s_t.data());
        if (blk.masked && !(do_finite && all_finite(k.data, k.ld, kn, dim) &&
                            all_finite(v.data, v.ld, kn, dim))) {
          return grad_query_visible(qn, kn, dim, s_t.data(), shift.data(), delta.data(), k, v,
                                    do_t.data(), grad_q.data());
        }
        for (int64_t j = 0; j < kn; ++j) {
          exp_shift_columns(s_t.data() + j * qn, shift.data(), static_cast<T*>(nullptr), qn);
        }
        gemm<false>(kn, qn, dim, v.data, v.ld, do_t.data(), qn, dp_t.data(), qn);
        for (int64_t j = 0; j < kn; ++j) {
          softmax_grad_columns(s_t.data() + j * qn, dp_t.data() + j * qn, delta.data(), qn);
        }
        gemm<true, true>(qn, dim, kn, dp_t.data(), qn, k.data, k.ld, grad_q.data(), dim);
      });
      store_rows(qn, dim, grad_q.data(), static_cast<T>(p.scale),
                 static_cast<scalar_t*>(g.grad_q) + row0 * dim, dim);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const BackwardParams& g) {
  compute_delta<scalar_t>(g);
  grad_key_value_kernel<scalar_t>(g);
  grad_query_kernel<scalar_t>(g);
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
