// Block-sparse attention backward, FlashAttention-2 style, P recomputed from the saved lse:
//   1. delta_kernel:    delta = rowsum(dO * O) - dlse, fp32.
//   2. grad_kv_kernel:  a thread block per (64-key tile, kv head, sequence) walks the column lists
//      of every query head of the kv head's group: dV += P^T dO, dK += dS^T Q, and (without
//      the dQ pass) dQ += dS K by fp32 atomics into an accumulator.
//   3. grad_q_kernel:   the dQ pass (deterministic mode; Hopper at head dim 128): a thread
//      block per query block walks its row list and accumulates dQ in registers, with no
//      atomics, so results are bit-identical.
// The final dQ = scale * accumulator conversion runs on the host side as one tensor op.
#pragma once

#include "forward_kernel.cuh"

namespace sparse_attention::cuda {

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(128) delta_kernel(const __grid_constant__ Params p) {
  static_assert(kHeadDim % 32 == 0, "a lane reads kHeadDim / 32 columns");
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;  // over B*H*Nq
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.batch) * p.heads * p.q_len) return;
  const int q = row % p.q_len, head = (row / p.q_len) % p.heads, batch = row / (int64_t(p.q_len) * p.heads);
  const Element* o = operand_head<Element>(p.out_in, batch, head) + q * p.out_in.row_stride;
  const Element* d_o = operand_head<Element>(p.grad_out, batch, head) + q * p.grad_out.row_stride;
  float sum = 0.f;
#pragma unroll
  for (int j = lane; j < kHeadDim; j += 32) {
    sum += ElementOps<Element>::to_float(o[j]) * ElementOps<Element>::to_float(d_o[j]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = p.grad_lse ? sum - p.grad_lse[row] : sum;
}

// log2-domain lse of a query row for recomputing P = exp2(s - lse2): +inf for rows that saw
// no key and rows past the end, so that every P of theirs is exactly 0.
__device__ __forceinline__ float lse_base2(const Params& p, int64_t row_index, bool in_range) {
  const float lse = in_range ? p.lse[row_index] : -INFINITY;
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kColThreads)
    grad_kv_kernel(const __grid_constant__ Params p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kThreads = Traits::kColThreads;
  constexpr int kQTile = Traits::kQueryTileElems;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  Element* s_k = reinterpret_cast<Element*>(shared_bytes);  // [kKeyTile][D]
  Element* s_v = s_k + Traits::kKVTileElems;                // [kKeyTile][D]
  Element* s_q = s_v + Traits::kKVTileElems;                // [2][kQueryTile][D]
  Element* s_do = s_q + 2 * kQTile;                         // [2][kQueryTile][D]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kQTile);  // [2][kQueryTile]
  float* s_delta = s_lse + 2 * kQueryTile;                     // [2][kQueryTile]
  // [kKeyTile][kQueryTile]: dS^T for the atomic dQ only (past kGradKVBeforeDqPassSmem).
  Element* s_ds = reinterpret_cast<Element*>(s_delta + 2 * kQueryTile);

  const int kb = blockIdx.x / Traits::kSubTiles;
  const int k0 = blockIdx.x * kKeyTile;  // == kb * block_size + sub * kKeyTile
  const int kv_head = blockIdx.y, s_index = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const Sequence seq = sequence_of(p, s_index);
  const int q_len = static_cast<int>(seq.q_len), k_len = static_cast<int>(seq.k_len);
  if (k0 >= k_len) return;  // a sub-tile wholly past the end: nothing to write

  load_tile_async<kKeyTile, D, kThreads>(s_k, sequence_rows<Element>(p.k, seq, kv_head, seq.k_begin),
                                         p.k.row_stride, k0, k_len);
  load_tile_async<kKeyTile, D, kThreads>(s_v, sequence_rows<Element>(p.v, seq, kv_head, seq.k_begin),
                                         p.v.row_stride, k0, k_len);
  cp_async_commit();

  BlockWalk<false, Traits::kSubTiles, kQueryTile> walk(p, seq, s_index, kv_head, kb);
  if (key_block_state(p, seq.batch, kb) == KeyBlockState::kAllPadded) walk.done = true;  // all P = 0
  auto load = [&](int buffer) {
    const int head = walk.query_head(), q0 = walk.tile_start();
    load_tile_async<kQueryTile, D, kThreads>(s_q + buffer * kQTile,
                                             sequence_rows<Element>(p.q, seq, head, seq.q_begin),
                                             p.q.row_stride, q0, q_len);
    load_tile_async<kQueryTile, D, kThreads>(s_do + buffer * kQTile,
                                             sequence_rows<Element>(p.grad_out, seq, head, seq.q_begin),
                                             p.grad_out.row_stride, q0, q_len);
    for (int i = threadIdx.x; i < kQueryTile; i += kThreads) {
      const int q = q0 + i;
      const int64_t row = flat_row(seq, p.heads, head, p.q_len, seq.q_begin, q);
      s_lse[buffer * kQueryTile + i] = lse_base2(p, row, q < q_len);
      s_delta[buffer * kQueryTile + i] = q < q_len ? p.delta[row] : 0.f;
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const int key_row0 = warp * kRowsPerWarp;  // this warp's 16 keys within the tile
  for_each_step_pipelined(walk, load, [&](int buffer, const Step& step, int q0, int head) {
    const Element* q_tile = s_q + buffer * kQTile;
    const Element* do_tile = s_do + buffer * kQTile;
    const float* lse2 = s_lse + buffer * kQueryTile;
    const float* delta = s_delta + buffer * kQueryTile;
    // S^T = K Q^T (keys in rows), P^T = exp2(S^T - lse2) per query column.
    float pt[kQueryTile / 8][4];
    zero(pt);
    gemm_a_smem_b_nk<D, kQueryTile, D, D>(pt, s_k, key_row0, q_tile, 0);
    scale_and_mask<true, kQueryTile>(pt, p, seq, block_needs_mask(p, seq, step.block, kb),
                                     k0 + key_row0, q0);
#pragma unroll
    for (int j = 0; j < kQueryTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) pt[j][e] = exp2f(pt[j][e] - lse2[j * 8 + 2 * c + (e & 1)]);
    }
    // dV += P^T dO. P^T is kept only as the rounded operand of this product (dS below is
    // formed from it too), which frees 32 registers for the dK/dV accumulators at D = 128.
    uint32_t p_frag[kQueryTile / 16][4];
    accumulator_to_a<kQueryTile, Element>(p_frag, pt);
    gemm_a_regs_b_kn<kQueryTile, D, D>(dv, p_frag, do_tile, 0);
    // dP^T = V dO^T; dS^T = P^T (dP^T - delta); dK += dS^T Q.
    float dst[kQueryTile / 8][4];
    zero(dst);
    gemm_a_smem_b_nk<D, kQueryTile, D, D>(dst, s_v, key_row0, do_tile, 0);
#pragma unroll
    for (int j = 0; j < kQueryTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dst[j][e] = packed_element<Element, kQueryTile>(p_frag, j, e) *
                    (dst[j][e] - delta[j * 8 + 2 * c + (e & 1)]);
      }
    }
    uint32_t ds_frag[kQueryTile / 16][4];
    accumulator_to_a<kQueryTile, Element>(ds_frag, dst);
    gemm_a_regs_b_kn<kQueryTile, D, D>(dk, ds_frag, q_tile, 0);

    if (!p.grad_q_pass) {
      // dQ += dS K for the tile's queries: dS^T goes through shared memory so that each warp
      // can take 16 query rows; the sums land in the fp32 accumulator by atomics.
#pragma unroll
      for (int j = 0; j < kQueryTile / 16; ++j) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int col = j * 16 + half * 8 + 2 * c;
          *reinterpret_cast<uint32_t*>(s_ds + swizzle<kQueryTile>(key_row0 + g, col)) = ds_frag[j][2 * half];
          *reinterpret_cast<uint32_t*>(s_ds + swizzle<kQueryTile>(key_row0 + g + 8, col)) =
              ds_frag[j][2 * half + 1];
        }
      }
      __syncthreads();
      uint32_t a[kKeyTile / 16][4];  // dS rows = this warp's 16 queries, over all keys
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
        load_a_transposed<kQueryTile>(a[kk], s_ds, warp * kRowsPerWarp, kk * 16);
      }
      float* dq_head = p.grad_q_accum + flat_row(seq, p.heads, head, p.q_len, seq.q_begin, 0) * D;
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        float acc[2][4];
        zero(acc);
#pragma unroll
        for (int kk = 0; kk < kKeyTile / 16; ++kk) {
          uint32_t b[4];
          load_b_transposed<D>(b, s_k, kk * 16, n * 16);
          ElementOps<Element>::mma(acc[0], a[kk], b[0], b[1]);
          ElementOps<Element>::mma(acc[1], a[kk], b[2], b[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int q = q0 + warp * kRowsPerWarp + g + 8 * r;
          if (q >= q_len) continue;
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            float* dst_row = dq_head + static_cast<int64_t>(q) * D + n * 16 + t * 8 + 2 * c;
            atomicAdd(dst_row, acc[t][2 * r]);
            atomicAdd(dst_row + 1, acc[t][2 * r + 1]);
          }
        }
      }
    }
  });

  // dK = scale * dS^T Q, dV as summed; rows past the end are not written.
  auto* grad_k = static_cast<Element*>(p.grad_k);
  auto* grad_v = static_cast<Element*>(p.grad_v);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = k0 + key_row0 + g + 8 * r;
    if (key >= k_len) continue;
    const int64_t row = flat_row(seq, p.kv_heads, kv_head, p.k_len, seq.k_begin, key);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<uint32_t*>(grad_k + row * D + j * 8 + 2 * c) =
          ElementOps<Element>::pack(dk[j][2 * r] * p.scale, dk[j][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(grad_v + row * D + j * 8 + 2 * c) =
          ElementOps<Element>::pack(dv[j][2 * r], dv[j][2 * r + 1]);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kRowThreads)
    grad_q_kernel(const __grid_constant__ Params p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kThreads = Traits::kRowThreads;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  Element* s_q = reinterpret_cast<Element*>(shared_bytes);
  Element* s_do = s_q + Traits::kQTileElems;  // then the K/V tiles

  const int qb = blockIdx.x, head = blockIdx.y, s_index = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int q0 = qb * Traits::kBlockSize;
  const Sequence seq = sequence_of(p, s_index);
  if (q0 >= seq.q_len) return;  // past a packed document's blocks (the grid fits the longest)
  const int q_len = static_cast<int>(seq.q_len);
  const KeyValueTiles<Traits> kv(s_do + Traits::kQTileElems, p, seq, head / (p.heads / p.kv_heads));

  load_tile_async<Traits::kBlockSize, D, kThreads>(
      s_q, sequence_rows<Element>(p.q, seq, head, seq.q_begin), p.q.row_stride, q0, q_len);
  load_tile_async<Traits::kBlockSize, D, kThreads>(
      s_do, sequence_rows<Element>(p.grad_out, seq, head, seq.q_begin), p.grad_out.row_stride, q0,
      q_len);
  cp_async_commit();

  float lse2[2], delta[2];
  const int64_t row_base = flat_row(seq, p.heads, head, p.q_len, seq.q_begin, 0);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = q0 + warp * kRowsPerWarp + g + 8 * r;
    lse2[r] = lse_base2(p, row_base + q, q < q_len);
    delta[r] = q < q_len ? p.delta[row_base + q] : 0.f;
  }

  float dq[D / 8][4];
  zero(dq);
  BlockWalk<true, Traits::kSubTiles, kKeyTile> walk(p, seq, s_index, head, qb);
  auto load = [&](int buffer) { kv.load(buffer, walk.tile_start()); };
  for_each_step_pipelined(walk, load, [&](int buffer, const Step& step, int k0, int) {
    // P = exp2(S - lse2); dP = dO V^T; dS = P (dP - delta); dQ += dS K.
    float s[kKeyTile / 8][4];
    masked_row_scores<Traits>(s, p, seq, s_q, kv.k_tile(buffer), qb, step.block, k0);
    float dp[kKeyTile / 8][4];
    zero(dp);
    gemm_a_smem_b_nk<D, kKeyTile, D, D>(dp, s_do, warp * kRowsPerWarp, kv.v_tile(buffer), 0);
#pragma unroll
    for (int j = 0; j < kKeyTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp2f(s[j][e] - lse2[e / 2]) * (dp[j][e] - delta[e / 2]);
    }
    uint32_t ds_frag[kKeyTile / 16][4];
    accumulator_to_a<kKeyTile, Element>(ds_frag, s);
    gemm_a_regs_b_kn<kKeyTile, D, D>(dq, ds_frag, kv.k_tile(buffer), 0);
  });

  auto* grad_q = static_cast<Element*>(p.grad_q);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = q0 + warp * kRowsPerWarp + g + 8 * r;
    if (q >= q_len) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<uint32_t*>(grad_q + (row_base + q) * D + j * 8 + 2 * c) =
          ElementOps<Element>::pack(dq[j][2 * r] * p.scale, dq[j][2 * r + 1] * p.scale);
    }
  }
}

}  // namespace sparse_attention::cuda
