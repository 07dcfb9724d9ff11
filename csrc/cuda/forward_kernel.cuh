// Block-sparse attention forward, FlashAttention-2 style: a thread block per (query block,
// head, sequence: a batch entry or a packed document) walks the query block's row list one
// key tile at a time (64 keys; 32 or 64 in the opt-in FA2 tiling, see RowTiling). The next
// K/V tile is copied with cp.async while the current one is multiplied on tensor cores; the
// online softmax runs in registers in base 2 (scale * log2(e) folded into one multiply, or in
// the FA2 tiling into the exponent's FFMA); only partial blocks apply the element mask. Out
// and lse are written once at the end.
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

// Scales a score tile into base-2 units (unless !scale: the FA2 tiling folds the scale into
// the exponent) and, when `masked`, hides what the element rules hide. Rows are queries
// q_row0 + g (+8) and columns keys k_col0 + 8j + 2c (+1) (row tiles), or the other way round
// (column tiles, kKeysInRows).
template <bool kKeysInRows, int kN>
__device__ __forceinline__ void scale_and_mask(float (&s)[kN / 8][4], const Params& p,
                                               const Sequence& seq, bool masked, int row0, int col0,
                                               bool scale = true) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = scale ? s[j][e] * p.scale_log2 : s[j][e];  // scale first: a negative scale must not flip -inf
      if (masked) {
        const int row = row0 + g + (e >= 2 ? 8 : 0), col = col0 + j * 8 + 2 * c + (e & 1);
        const int query = kKeysInRows ? col : row, key = kKeysInRows ? row : col;
        if (!element_visible(p, seq, query, key)) x = -INFINITY;
      }
      s[j][e] = x;
    }
  }
}

// S = Q K^T for kTiles m16 row tiles of query block qb (rows row0 + 16t .. within the block)
// against the kTile keys starting at k0 (of key block kb): scaled to base 2 when `scale`, and
// masked if the block needs it. s[t] is row tile t, in the C-fragment layout.
template <typename Traits, int kTiles, int kTile, bool kCompact>
__device__ __forceinline__ void masked_row_scores(float (&s)[kTiles][kTile / 8][4], const Params& p,
                                                  const Sequence& seq,
                                                  const typename Traits::Element* s_q,
                                                  const typename Traits::Element* k_tile, int row0,
                                                  int qb, int kb, int k0, bool scale) {
  constexpr int D = Traits::kHeadDim;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) zero(s[t]);
  gemm_a_smem_b_nk<D, kTile, D, D, kTiles, kCompact>(s, s_q, row0, k_tile, 0);
  const bool masked = block_needs_mask(p, seq, qb, kb);
  if (!masked && !scale) return;  // a full block with the scale folded: raw scores
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    scale_and_mask<false, kTile>(s[t], p, seq, masked, qb * Traits::kBlockSize + row0 + 16 * t, k0, scale);
  }
}

// The same for this warp's 16 query rows and a 64-key tile, scaled (the dQ pass).
template <typename Traits>
__device__ __forceinline__ void masked_row_scores(float (&s)[kKeyTile / 8][4], const Params& p,
                                                  const Sequence& seq,
                                                  const typename Traits::Element* s_q,
                                                  const typename Traits::Element* k_tile, int qb,
                                                  int kb, int k0) {
  masked_row_scores<Traits, 1, kKeyTile, false>(as_row_tiles(s), p, seq, s_q, k_tile,
                                                threadIdx.x / 32 * kRowsPerWarp, qb, kb, k0, true);
}

// The double-buffered K and V tiles of a row walk (forward and dQ-pass kernels), of
// Tiling::kKeyTile keys each, copied by Tiling::kThreads threads.
template <typename Traits, typename Tiling = RowTiling<Traits, 1>>
struct KeyValueTiles {
  using Element = typename Traits::Element;
  static constexpr int kTileElems = Tiling::kKVTileElems;
  Element* k;  // [2][kKeyTile][D]
  Element* v;  // [2][kKeyTile][D]
  const Element* k_head;  // the sequence's first key row of the kv head
  const Element* v_head;
  const Params& p;
  int k_len;  // the sequence's keys

  __device__ KeyValueTiles(Element* shared, const Params& params, const Sequence& seq, int kv_head)
      : k(shared), v(shared + 2 * kTileElems),
        k_head(sequence_rows<Element>(params.k, seq, kv_head, seq.k_begin)),
        v_head(sequence_rows<Element>(params.v, seq, kv_head, seq.k_begin)), p(params),
        k_len(static_cast<int>(seq.k_len)) {}

  __device__ void load(int buffer, int k0) const {
    load_tile_async<Tiling::kKeyTile, Traits::kHeadDim, Tiling::kThreads, Tiling::kFa2>(
        k + buffer * kTileElems, k_head, p.k.row_stride, k0, k_len);
    load_tile_async<Tiling::kKeyTile, Traits::kHeadDim, Tiling::kThreads, Tiling::kFa2>(
        v + buffer * kTileElems, v_head, p.v.row_stride, k0, k_len);
  }
  __device__ const Element* k_tile(int buffer) const { return k + buffer * kTileElems; }
  __device__ const Element* v_tile(int buffer) const { return v + buffer * kTileElems; }
};

// One online-softmax step of an m16 row tile (rows g, r = 0, and g + 8, r = 1): the scores
// become P = exp2(s - shift) in place, and the tile's output rows and running sums are
// rescaled. kFold: the scores reach base-2 units only once multiplied by `mult` (> 0; 1 when
// already scaled), P = exp2(s * mult - shift) is one FFMA and an exp2 per score, and the
// maximum is taken on the raw scores: with mult > 0 the maximum of the scaled scores is the
// scaled maximum (rounding is monotonic), so the shift is the one the scaled scores would give.
template <int kN, int D, bool kFold>
__device__ __forceinline__ void online_softmax_tile(float (&s)[kN / 8][4], float (&o)[D / 8][4],
                                                    float (&row_max)[2], float (&row_sum)[2], float mult) {
  float shift[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) m = fmaxf(m, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    const float tile_max = kFold ? quad_max(m) * mult : quad_max(m);
    const SoftmaxStep step = online_softmax_step(row_max[r], row_sum[r], tile_max);
    shift[r] = step.shift;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][2 * r] *= step.correction;
      o[j][2 * r + 1] *= step.correction;
    }
  }
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = exp2f(kFold ? fmaf(s[j][e], mult, -shift[e / 2]) : s[j][e] - shift[e / 2]);
      row_sum[e / 2] += s[j][e];  // this lane's part; the quad is summed once at the end
    }
  }
}

// Writes the finished rows row0 + g (+8) (within the sequence) of an m16 row tile: out and lse.
template <typename Element, int D>
__device__ __forceinline__ void store_row_tile(const Params& p, const Sequence& seq, int head, int row0,
                                               const float (&o)[D / 8][4], const float (&row_max)[2],
                                               const float (&row_sum)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  auto* out = static_cast<Element*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const int row = row0 + g + 8 * r;
    if (row >= seq.q_len) continue;
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

// The forward of one thread block, for either row tiling (see RowTiling): each warp owns
// Tiling::kRowTiles m16 row tiles, rows q0 + warp * kRows + 16t + g (+8).
template <typename Traits, typename Tiling>
__device__ __forceinline__ void forward_rows(const Params& p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kTiles = Tiling::kRowTiles, kTile = Tiling::kKeyTile;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  Element* s_q = reinterpret_cast<Element*>(shared_bytes);

  // The FA2 tiling starts with the last query blocks: under causal-like layouts their lists
  // are the longest, so the short ones fill the tail of the grid.
  const int block_x = static_cast<int>(blockIdx.x);
  const int qb = Tiling::kFa2 ? p.q_blocks - 1 - block_x : block_x;
  const int head = blockIdx.y, s_index = blockIdx.z;
  const int row0 = threadIdx.x / 32 * Tiling::kRows;  // this warp's first row in the block
  const int q0 = qb * Traits::kBlockSize;
  const Sequence seq = sequence_of(p, s_index);
  if (q0 >= seq.q_len) return;  // past a packed document's blocks (the grid fits the longest)
  const int q_len = static_cast<int>(seq.q_len);
  const KeyValueTiles<Traits, Tiling> kv(s_q + Traits::kQTileElems, p, seq, head / (p.heads / p.kv_heads));

  load_tile_async<Traits::kBlockSize, D, Tiling::kThreads, Tiling::kFa2>(
      s_q, sequence_rows<Element>(p.q, seq, head, seq.q_begin), p.q.row_stride, q0, q_len);
  cp_async_commit();

  // The FA2 tiling keeps the scores raw (masked ones -inf) and applies the scale in the
  // exponent's FFMA, which needs a positive scale (launch_forward sends the others to the
  // default tiling, which scales before the mask and the maximum so that a negative scale
  // never meets -inf).
  constexpr bool fold = Tiling::kFa2;
  const float mult = fold ? p.scale_log2 : 1.f;
  float o[kTiles][D / 8][4];
  float row_max[kTiles][2], row_sum[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    zero(o[t]);
    row_max[t][0] = row_max[t][1] = -INFINITY;
    row_sum[t][0] = row_sum[t][1] = 0.f;
  }
  BlockWalk<true, Tiling::kSubTiles, kTile> walk(p, seq, s_index, head, qb);
  auto load = [&](int buffer) { kv.load(buffer, walk.tile_start()); };
  for_each_step_pipelined(walk, load, [&](int buffer, const Step& step, int k0, int) {
    float s[kTiles][kTile / 8][4];
    masked_row_scores<Traits, kTiles, kTile, Tiling::kFa2>(s, p, seq, s_q, kv.k_tile(buffer), row0, qb,
                                                           step.block, k0, !fold);
    uint32_t p_frag[kTiles][kTile / 16][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      online_softmax_tile<kTile, D, Tiling::kFa2>(s[t], o[t], row_max[t], row_sum[t], mult);
      accumulator_to_a<kTile, Element>(p_frag[t], s[t]);
    }
    gemm_a_regs_b_kn<kTile, D, D, kTiles, Tiling::kFa2>(o, p_frag, kv.v_tile(buffer), 0);
  });

#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    store_row_tile<Element, D>(p, seq, head, q0 + row0 + 16 * t, o[t], row_max[t], row_sum[t]);
  }
}

// The default forward: a warp per 16 query rows, 64-key tiles.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kRowThreads)
    forward_kernel(const __grid_constant__ Params p) {
  forward_rows<Traits, RowTiling<Traits, 1>>(p);
}

// The opt-in FlashAttention-2 tiling: a warp per 32 query rows, two thread blocks per SM.
template <typename Traits>
__global__ void __launch_bounds__(RowTiling<Traits, 2>::kThreads, RowTiling<Traits, 2>::kMinBlocksPerSM)
    forward_kernel_fa2(const __grid_constant__ Params p) {
  forward_rows<Traits, RowTiling<Traits, 2>>(p);
}

}  // namespace sparse_attention::cuda
