// Block-sparse attention forward, FlashAttention-2 style: a thread block per (query block,
// head, sequence: a batch entry or a packed document) walks the query block's row list one
// 64-key tile at a time. The next K/V tile is copied with cp.async while the current one is
// multiplied on tensor cores; the online softmax runs in registers in base 2 (scale * log2(e)
// folded into one multiply); only partial blocks apply the element mask. Out and lse are
// written once at the end.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "block_walk.cuh"
#include "kernel_traits.h"
#include "online_softmax.cuh"
#include "tensor_core.cuh"

namespace sparse_attention::cuda {

template <typename Element>
__device__ __forceinline__ const Element* operand_head(const Operand& op, int batch, int head) {
  return static_cast<const Element*>(op.data) + batch * op.batch_stride + head * op.head_stride;
}

// First row of a sequence's head in an operand (begin: the sequence's q_begin or k_begin).
template <typename Element>
__device__ __forceinline__ const Element* sequence_rows(const Operand& op, const Sequence& seq,
                                                        int head, int64_t begin) {
  return operand_head<Element>(op, static_cast<int>(seq.batch), head) + begin * op.row_stride;
}

// Scales a score tile into base-2 units and, when `masked`, hides what the element rules
// hide. Rows are queries q_row0 + g (+8) and columns keys k_col0 + 8j + 2c (+1) (row tiles),
// or the other way round (column tiles, kKeysInRows).
template <bool kKeysInRows, int kN>
__device__ __forceinline__ void scale_and_mask(float (&s)[kN / 8][4], const Params& p,
                                               const Sequence& seq, bool masked, int row0, int col0) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[j][e] * p.scale_log2;  // scale first: a negative scale must not flip -inf
      if (masked) {
        const int row = row0 + g + (e >= 2 ? 8 : 0), col = col0 + j * 8 + 2 * c + (e & 1);
        const int query = kKeysInRows ? col : row, key = kKeysInRows ? row : col;
        if (!element_visible(p, seq, query, key)) x = -INFINITY;
      }
      s[j][e] = x;
    }
  }
}

// S = Q K^T for this warp's 16 query rows of query block qb against the key tile starting
// at k0 (of key block kb), scaled to base 2 and masked if the block needs it.
template <typename Traits>
__device__ __forceinline__ void masked_row_scores(float (&s)[kKeyTile / 8][4], const Params& p,
                                                  const Sequence& seq,
                                                  const typename Traits::Element* s_q,
                                                  const typename Traits::Element* k_tile, int qb,
                                                  int kb, int k0) {
  constexpr int D = Traits::kHeadDim;
  const int row0 = threadIdx.x / 32 * kRowsPerWarp;
  zero(s);
  gemm_a_smem_b_nk<D, kKeyTile, D, D>(s, s_q, row0, k_tile, 0);
  scale_and_mask<false, kKeyTile>(s, p, seq, block_needs_mask(p, seq, qb, kb),
                                  qb * Traits::kBlockSize + row0, k0);
}

// The double-buffered K and V tiles of a row walk (forward and dQ-pass kernels).
template <typename Traits>
struct KeyValueTiles {
  using Element = typename Traits::Element;
  Element* k;  // [2][kKeyTile][D]
  Element* v;  // [2][kKeyTile][D]
  const Element* k_head;  // the sequence's first key row of the kv head
  const Element* v_head;
  const Params& p;
  int k_len;  // the sequence's keys

  __device__ KeyValueTiles(Element* shared, const Params& params, const Sequence& seq, int kv_head)
      : k(shared), v(shared + 2 * Traits::kKVTileElems),
        k_head(sequence_rows<Element>(params.k, seq, kv_head, seq.k_begin)),
        v_head(sequence_rows<Element>(params.v, seq, kv_head, seq.k_begin)), p(params),
        k_len(static_cast<int>(seq.k_len)) {}

  __device__ void load(int buffer, int k0) const {
    load_tile_async<kKeyTile, Traits::kHeadDim, Traits::kRowThreads>(
        k + buffer * Traits::kKVTileElems, k_head, p.k.row_stride, k0, k_len);
    load_tile_async<kKeyTile, Traits::kHeadDim, Traits::kRowThreads>(
        v + buffer * Traits::kKVTileElems, v_head, p.v.row_stride, k0, k_len);
  }
  __device__ const Element* k_tile(int buffer) const { return k + buffer * Traits::kKVTileElems; }
  __device__ const Element* v_tile(int buffer) const { return v + buffer * Traits::kKVTileElems; }
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kRowThreads)
    forward_kernel(const __grid_constant__ Params p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  Element* s_q = reinterpret_cast<Element*>(shared_bytes);

  const int qb = blockIdx.x, head = blockIdx.y, s_index = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int q0 = qb * Traits::kBlockSize;
  const Sequence seq = sequence_of(p, s_index);
  if (q0 >= seq.q_len) return;  // past a packed document's blocks (the grid fits the longest)
  const int q_len = static_cast<int>(seq.q_len);
  const KeyValueTiles<Traits> kv(s_q + Traits::kQTileElems, p, seq, head / (p.heads / p.kv_heads));

  load_tile_async<Traits::kBlockSize, D, Traits::kRowThreads>(
      s_q, sequence_rows<Element>(p.q, seq, head, seq.q_begin), p.q.row_stride, q0, q_len);
  cp_async_commit();

  float o[D / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  BlockWalk<true, Traits::kSubTiles, kKeyTile> walk(p, seq, s_index, head, qb);
  auto load = [&](int buffer) { kv.load(buffer, walk.tile_start()); };
  for_each_step_pipelined(walk, load, [&](int buffer, const Step& step, int k0, int) {
    float s[kKeyTile / 8][4];
    masked_row_scores<Traits>(s, p, seq, s_q, kv.k_tile(buffer), qb, step.block, k0);

    // Online softmax for rows g (r = 0) and g + 8 (r = 1).
    float shift[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < kKeyTile / 8; ++j) m = fmaxf(m, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const SoftmaxStep step = online_softmax_step(row_max[r], row_sum[r], quad_max(m));
      shift[r] = step.shift;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * r] *= step.correction;
        o[j][2 * r + 1] *= step.correction;
      }
    }
#pragma unroll
    for (int j = 0; j < kKeyTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - shift[e / 2]);
        row_sum[e / 2] += s[j][e];  // this lane's part; the quad is summed once at the end
      }
    }
    uint32_t p_frag[kKeyTile / 16][4];
    accumulator_to_a<kKeyTile, Element>(p_frag, s);
    gemm_a_regs_b_kn<kKeyTile, D, D>(o, p_frag, kv.v_tile(buffer), 0);
  });

  auto* out = static_cast<Element*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const int row = q0 + warp * kRowsPerWarp + g + 8 * r;
    if (row >= q_len) continue;
    const int64_t out_row = flat_row(seq, p.heads, head, p.q_len, seq.q_begin, row);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that saw no key returns 0
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<uint32_t*>(out + out_row * D + j * 8 + 2 * c) =
          ElementOps<Element>::pack(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
    }
    if (c == 0) p.lse[out_row] = row_lse(row_max[r], sum);
  }
}

}  // namespace sparse_attention::cuda
