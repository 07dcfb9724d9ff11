// Block-sparse attention forward on the CPU, FlashAttention-2 style: one task per
// (batch, head, query block) walks its row of the layout with an online softmax, keeping
// the output accumulator in the accumulation type and writing out and lse once.
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
void forward_kernel(const ForwardParams& f) {
  using T = at::opmath_type<scalar_t>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Problem& p = f.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  const T scale = static_cast<T>(p.scale);
  const auto* q = static_cast<const scalar_t*>(f.q.data);
  const auto* k = static_cast<const scalar_t*>(f.k.data);
  const auto* v = static_cast<const scalar_t*>(f.v.data);
  auto* out = static_cast<scalar_t*>(f.out);
  auto* lse = static_cast<T*>(f.lse);

  run_parallel(p.batch * p.heads * p.q_blocks, [&](const NextTask& next) {
    std::vector<T> q_tile(bs * dim), k_t(dim * bs), v_tile(bs * dim), s(bs * bs),
        acc(bs * dim), row_max_so_far(bs), row_sum(bs);
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t qb = task % p.q_blocks, head = (task / p.q_blocks) % p.heads,
                    batch = task / (p.q_blocks * p.heads), kv_head = head / p.group();
      const int64_t q0 = qb * bs, qn = std::min(bs, p.q_len - q0);
      load_rows(qn, dim, q + batch * f.q.batch_stride + head * f.q.head_stride + q0 * f.q.row_stride,
                f.q.row_stride, scale, q_tile.data());
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(row_max_so_far.begin(), row_max_so_far.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), T(0));

      const int64_t list = p.layout_head(head) * p.q_blocks + qb;
      const int64_t begin = f.rows.offsets[list], end = f.rows.offsets[list + 1];
      const int64_t full_end = begin + f.rows.num_full[list];
      const scalar_t* k_head = k + batch * f.k.batch_stride + kv_head * f.k.head_stride;
      const scalar_t* v_head = v + batch * f.v.batch_stride + kv_head * f.v.head_stride;
      for (int64_t e = begin; e < end; ++e) {
        BlockPair blk;
        if (!make_block_pair(p, batch, qb, f.rows.indices[e], e >= full_end, &blk)) continue;
        load_rows_transposed(blk.kn, dim, k_head + blk.k0 * f.k.row_stride, f.k.row_stride,
                             k_t.data(), blk.kn);
        load_rows(blk.kn, dim, v_head + blk.k0 * f.v.row_stride, f.v.row_stride, T(1),
                  v_tile.data());
        block_scores(p, batch, blk, q_tile.data(), k_t.data(), s.data());
        // Online softmax: rescale what was accumulated when a row's maximum grows.
        for (int64_t i = 0; i < qn; ++i) {
          T* row = s.data() + i * blk.kn;
          const T new_max = std::max(row_max_so_far[i], row_max(row, blk.kn));
          if (new_max == kNegInf) {  // nothing visible in this row yet
            std::fill(row, row + blk.kn, T(0));
            continue;
          }
          const T correction =
              row_max_so_far[i] == kNegInf ? T(0) : std::exp(row_max_so_far[i] - new_max);
          const T block_sum = exp_shift_sum(row, blk.kn, new_max);
          if (correction != T(1)) scale_row(acc.data() + i * dim, dim, correction);
          row_sum[i] = row_sum[i] * correction + block_sum;
          row_max_so_far[i] = new_max;
        }
        gemm_nn<true>(qn, dim, blk.kn, s.data(), blk.kn, v_tile.data(), dim, acc.data(), dim);
      }

      const int64_t row0 = (batch * p.heads + head) * p.q_len + q0;
      for (int64_t i = 0; i < qn; ++i) {
        // A row that saw no key returns 0 with lse = -inf.
        const bool seen = row_sum[i] > T(0);
        const T inv = seen ? T(1) / row_sum[i] : T(0);
        lse[row0 + i] = seen ? row_max_so_far[i] + std::log(row_sum[i]) : kNegInf;
        store_rows(1, dim, acc.data() + i * dim, inv, out + (row0 + i) * dim, dim);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
