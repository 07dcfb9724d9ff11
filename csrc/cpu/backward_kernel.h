// Block-sparse attention backward on the CPU, deterministic and free of atomics:
//   1. delta = rowsum(dO * O) - dlse;
//   2. one task per (batch, kv head, key block) walks its column of the layout (for every
//      query head of the GQA group) and accumulates dK and dV;
//   3. one task per (batch, head, query block) walks its row and accumulates dQ.
// P is recomputed from the saved lse in both passes.
#pragma once

#include <ATen/OpMathType.h>

#include <vector>

#include "attention_tile.h"
#include "parallel.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
void compute_delta(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const auto* out = static_cast<const scalar_t*>(g.out.data);
  const auto* grad_out = static_cast<const scalar_t*>(g.grad_out.data);
  const auto* grad_lse = static_cast<const T*>(g.grad_lse);
  auto* delta = static_cast<T*>(g.delta);
  run_parallel(p.batch * p.heads, [&](const NextTask& next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t batch = task / p.heads, head = task % p.heads;
      const scalar_t* o = out + batch * g.out.batch_stride + head * g.out.head_stride;
      const scalar_t* d_o = grad_out + batch * g.grad_out.batch_stride + head * g.grad_out.head_stride;
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

// Query-side tiles of one (batch, head, query block): scaled Q, dO, lse and delta.
template <typename scalar_t, typename T>
struct QueryTiles {
  std::vector<T> q, grad_out, lse, delta;
  QueryTiles(int64_t bs, int64_t dim) : q(bs * dim), grad_out(bs * dim), lse(bs), delta(bs) {}

  void load(const BackwardParams& g, int64_t batch, int64_t head, int64_t q0, int64_t qn) {
    const Problem& p = g.problem;
    const int64_t dim = p.head_dim;
    load_rows(qn, dim,
              static_cast<const scalar_t*>(g.q.data) + batch * g.q.batch_stride +
                  head * g.q.head_stride + q0 * g.q.row_stride,
              g.q.row_stride, static_cast<T>(p.scale), q.data());
    load_rows(qn, dim,
              static_cast<const scalar_t*>(g.grad_out.data) + batch * g.grad_out.batch_stride +
                  head * g.grad_out.head_stride + q0 * g.grad_out.row_stride,
              g.grad_out.row_stride, T(1), grad_out.data());
    const int64_t row0 = (batch * p.heads + head) * p.q_len + q0;
    std::copy_n(static_cast<const T*>(g.lse) + row0, qn, lse.data());
    std::copy_n(static_cast<const T*>(g.delta) + row0, qn, delta.data());
  }
};

// P and dS = P * (dP - delta) of one block pair; p_tile and ds_tile are [qn x kn].
template <typename scalar_t, typename T>
inline void block_softmax_grad(const Problem& p, int64_t batch, const BlockPair& blk,
                               const QueryTiles<scalar_t, T>& qt, const T* k_t, const T* v_t,
                               T* p_tile, T* ds_tile) {
  block_scores(p, batch, blk, qt.q.data(), k_t, p_tile);
  probabilities_from_lse(blk, qt.lse.data(), p_tile);
  gemm_nn<false>(blk.qn, blk.kn, p.head_dim, qt.grad_out.data(), p.head_dim, v_t, blk.kn,
                 ds_tile, blk.kn);
  for (int64_t i = 0; i < blk.qn; ++i) {
    softmax_grad_row(p_tile + i * blk.kn, ds_tile + i * blk.kn, blk.kn, qt.delta[i]);
  }
}

template <typename scalar_t>
void grad_key_value_kernel(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  run_parallel(p.batch * p.kv_heads * p.k_blocks, [&](const NextTask& next) {
    QueryTiles<scalar_t, T> qt(bs, dim);
    std::vector<T> k_t(dim * bs), v_t(dim * bs), p_tile(bs * bs), ds_tile(bs * bs),
        transposed(bs * bs), grad_k(bs * dim), grad_v(bs * dim);
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t kb = task % p.k_blocks, kv_head = (task / p.k_blocks) % p.kv_heads,
                    batch = task / (p.k_blocks * p.kv_heads);
      const int64_t k0 = kb * bs, kn = std::min(bs, p.k_len - k0);
      std::fill(grad_k.begin(), grad_k.end(), T(0));
      std::fill(grad_v.begin(), grad_v.end(), T(0));
      load_rows_transposed(kn, dim,
                           static_cast<const scalar_t*>(g.k.data) + batch * g.k.batch_stride +
                               kv_head * g.k.head_stride + k0 * g.k.row_stride,
                           g.k.row_stride, k_t.data(), kn);
      load_rows_transposed(kn, dim,
                           static_cast<const scalar_t*>(g.v.data) + batch * g.v.batch_stride +
                               kv_head * g.v.head_stride + k0 * g.v.row_stride,
                           g.v.row_stride, v_t.data(), kn);
      for (int64_t head = kv_head * p.group(); head < (kv_head + 1) * p.group(); ++head) {
        const int64_t list = p.layout_head(head) * p.k_blocks + kb;
        const int64_t begin = g.cols.offsets[list], end = g.cols.offsets[list + 1];
        const int64_t full_end = begin + g.cols.num_full[list];
        for (int64_t e = begin; e < end; ++e) {
          const int64_t qb = g.cols.indices[e];
          BlockPair blk;
          if (!make_block_pair(p, batch, qb, kb, e >= full_end, &blk)) continue;
          qt.load(g, batch, head, blk.q0, blk.qn);
          block_softmax_grad(p, batch, blk, qt, k_t.data(), v_t.data(), p_tile.data(),
                             ds_tile.data());
          // dV += P^T dO and dK += dS^T (scale * Q).
          transpose(blk.qn, kn, p_tile.data(), kn, transposed.data(), blk.qn);
          gemm_nn<true>(kn, dim, blk.qn, transposed.data(), blk.qn, qt.grad_out.data(), dim,
                        grad_v.data(), dim);
          transpose(blk.qn, kn, ds_tile.data(), kn, transposed.data(), blk.qn);
          gemm_nn<true>(kn, dim, blk.qn, transposed.data(), blk.qn, qt.q.data(), dim,
                        grad_k.data(), dim);
        }
      }
      const int64_t row0 = (batch * p.kv_heads + kv_head) * p.k_len + k0;
      store_rows(kn, dim, grad_k.data(), T(1), static_cast<scalar_t*>(g.grad_k) + row0 * dim, dim);
      store_rows(kn, dim, grad_v.data(), T(1), static_cast<scalar_t*>(g.grad_v) + row0 * dim, dim);
    }
  });
}

template <typename scalar_t>
void grad_query_kernel(const BackwardParams& g) {
  using T = at::opmath_type<scalar_t>;
  const Problem& p = g.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  run_parallel(p.batch * p.heads * p.q_blocks, [&](const NextTask& next) {
    QueryTiles<scalar_t, T> qt(bs, dim);
    std::vector<T> k_t(dim * bs), v_t(dim * bs), k_tile(bs * dim), p_tile(bs * bs),
        ds_tile(bs * bs), grad_q(bs * dim);
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t qb = task % p.q_blocks, head = (task / p.q_blocks) % p.heads,
                    batch = task / (p.q_blocks * p.heads), kv_head = head / p.group();
      const int64_t q0 = qb * bs, qn = std::min(bs, p.q_len - q0);
      std::fill(grad_q.begin(), grad_q.end(), T(0));
      qt.load(g, batch, head, q0, qn);
      const int64_t list = p.layout_head(head) * p.q_blocks + qb;
      const int64_t begin = g.rows.offsets[list], end = g.rows.offsets[list + 1];
      const int64_t full_end = begin + g.rows.num_full[list];
      const auto* k_head = static_cast<const scalar_t*>(g.k.data) + batch * g.k.batch_stride +
                           kv_head * g.k.head_stride;
      const auto* v_head = static_cast<const scalar_t*>(g.v.data) + batch * g.v.batch_stride +
                           kv_head * g.v.head_stride;
      for (int64_t e = begin; e < end; ++e) {
        BlockPair blk;
        if (!make_block_pair(p, batch, qb, g.rows.indices[e], e >= full_end, &blk)) continue;
        const scalar_t* k_rows = k_head + blk.k0 * g.k.row_stride;
        load_rows_transposed(blk.kn, dim, k_rows, g.k.row_stride, k_t.data(), blk.kn);
        load_rows(blk.kn, dim, k_rows, g.k.row_stride, T(1), k_tile.data());
        load_rows_transposed(blk.kn, dim, v_head + blk.k0 * g.v.row_stride, g.v.row_stride,
                             v_t.data(), blk.kn);
        block_softmax_grad(p, batch, blk, qt, k_t.data(), v_t.data(), p_tile.data(),
                           ds_tile.data());
        // dQ += dS K (times scale, applied once when storing).
        gemm_nn<true>(qn, dim, blk.kn, ds_tile.data(), blk.kn, k_tile.data(), dim,
                      grad_q.data(), dim);
      }
      const int64_t row0 = (batch * p.heads + head) * p.q_len + q0;
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
