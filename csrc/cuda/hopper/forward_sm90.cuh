// Block-sparse attention forward for Hopper (sm_90a), FlashAttention-3 style, written with
// CuTe so that the wgmma descriptors and TMA swizzles are derived (and checked) at compile
// time. A thread block per (128-row query block, head, sequence) as in the mma.sync kernel:
//   warpgroup 0, one thread: the producer. TMA-loads Q once, then for each key block of the
//     row list one K and one V tile (a layout block is 128 contiguous rows, so one TMA box at
//     the block's coordinate), into a kStages-deep mbarrier pipeline (pipeline.h).
//   warpgroups 1 and 2: consumers, 64 query rows each. S = Q K^T by SS-wgmma, the online
//     softmax in registers (base 2; the element rules only on partial blocks), O += P V by
//     RS-wgmma with P converted in registers. The product with V of one step runs while the
//     next step's scores go through the softmax (FlashAttention-3's intra-warpgroup overlap;
//     pipeline.h's consume_overlapped).
// Query blocks run last first: under causal-like layouts their row lists are the longest.
// setmaxnreg moves registers from the producer to the consumers. Block size 128 only.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "../list_walk.h"
#include "../online_softmax.cuh"
#include "../params.h"
#include "../tensor_core.cuh"
#include "pipeline.h"

namespace sparse_attention::cuda::hopper {

using namespace cute;

// The roles of both Hopper kernels' thread blocks: a producer warpgroup (one thread of it
// issues the TMA copies) and two consumer warpgroups, registers moved from the first to the
// others with setmaxnreg; a kStages-deep pipeline between them.
struct WarpgroupRoles {
  static constexpr int kStages = 2;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
  static_assert(kProducerRegisters * 128 + kConsumerRegisters * kConsumerThreads <= 65536,
                "the register file holds every warpgroup's allocation");
};

template <typename Element_, typename Native_, int kHeadDim_>
struct ForwardTraits : WarpgroupRoles {
  using Element = Element_;  // cutlass::half_t or cutlass::bfloat16_t
  using Native = Native_;    // __half or __nv_bfloat16, for the output stores
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128, kBlockN = 128;  // one layout block of queries, of keys

  using TileShape = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;
  using AtomLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;  // a warpgroup per 64 rows
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileShape>(),
                                        AtomLayout{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));

  // Rows of 64 or 128 two-byte elements: the 128-byte swizzle, K-major (head dim contiguous).
  static_assert(kHeadDim % 64 == 0, "head dims 64 and 128");
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V as the B operand of P V, (head dim, keys, stage): the same bytes, read MN-major.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                          cute::Step<_2, _1, _3>{})));

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTileBytes = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    uint64_t q_full;
    uint64_t full[2][kStages];   // [channel][stage]: the tile has landed
    uint64_t empty[2][kStages];  // every consumer thread has released it
  };
  static constexpr size_t kSharedBytes = sizeof(SharedStorage);

  // An operand as TMA sees it: (rows, head dim, heads, batch), unit stride along the head dim.
  using GmemLayout = Layout<Shape<int32_t, int32_t, int32_t, int32_t>, Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)), GmemLayout{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{},
                                      select<0, 2>(TileShape{}), _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutKV{}),
                                       select<1, 2>(TileShape{}), _1{}));
};

template <typename Traits>
struct ForwardArgs {
  Params p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k, tma_v;
  bool pingpong;  // the consumer warpgroups take turns issuing their products (PingPong)
};

// Named barriers over both consumer warpgroups (256 threads), for PingPong (pipeline.h).
struct ConsumerBarriers {
  __device__ void arrive(uint32_t id) const { cutlass::arch::NamedBarrier::arrive(256, id); }
  __device__ void sync(uint32_t id) const { cutlass::arch::NamedBarrier::sync(256, id); }
};

// The mbarriers of the K/V pipeline, as pipeline.h's loops use them.
template <int kStages>
struct BarrierSync {
  uint64_t (*full)[kStages];
  uint64_t (*empty)[kStages];

  __device__ void wait_empty(int channel, int stage, uint32_t parity) const {
    cutlass::arch::ClusterBarrier::wait(&empty[channel][stage], parity);
  }
  __device__ void wait_full(int channel, int stage, uint32_t parity) const {
    cutlass::arch::ClusterBarrier::wait(&full[channel][stage], parity);
  }
  // Every consumer thread arrives once its wgmma reading the stage has completed.
  __device__ void release(int channel, int stage) const {
    cutlass::arch::ClusterBarrier::arrive(&empty[channel][stage]);
  }
};

// From one thread: the barrier of the tiles loaded once (Q in the forward, K and V in the
// backward) and the pipeline's, before the block-wide barrier that publishes them.
template <int kConsumerThreads, int kStages>
__device__ void init_barriers(uint64_t& resident, uint64_t (&full)[2][kStages], uint64_t (&empty)[2][kStages]) {
  cutlass::arch::ClusterTransactionBarrier::init(&resident, 1);
  for (int channel = 0; channel < 2; ++channel) {
    for (int stage = 0; stage < kStages; ++stage) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[channel][stage], 1);
      cutlass::arch::ClusterBarrier::init(&empty[channel][stage], kConsumerThreads);
    }
  }
  cutlass::arch::fence_barrier_init();
}

// An accumulator fragment ((2, 2, N/8), M, N) viewed as (rows, columns) of this thread:
// rows (the pair g, g + 8; M), columns (the pair 2c, 2c + 1; N/8; N).
template <typename Layout>
__device__ __forceinline__ auto rows_by_columns(Layout l) {
  static_assert(rank_v<decltype(get<0>(l))> == 3 && rank_v<Layout> == 3, "an sm90 accumulator");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same registers as the A operand of the next wgmma: k16 slices of two n8 column groups,
// ((2, 2, 2), M, N/16). The accumulator and A fragments of wgmma share the thread mapping.
template <typename Layout>
__device__ __forceinline__ auto accumulator_as_a(Layout l) {
  auto pairs = logical_divide(get<0, 2>(l), Tile<_2>{});
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(pairs)), get<1>(l),
                     coalesce(make_layout(get<2>(l), get<0, 1>(pairs))));
}

template <typename A>
constexpr bool kRegisterOperand =
    !std::is_same_v<typename std::remove_reference_t<A>::iterator, GMMA::DescriptorIterator>;

// Issues one warpgroup GEMM as a wgmma group, not waited for: the fences keep the compiler
// from moving accumulator (and register A operand) accesses across the asynchronous wgmma;
// after warpgroup_wait, fence them again before touching them.
template <bool kZeroInit, typename Mma, typename A, typename B, typename C>
__device__ __forceinline__ void warpgroup_issue(Mma& mma, A&& a, const B& b, C& c) {
  if constexpr (kRegisterOperand<A>) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// One warpgroup GEMM, waited for.
template <bool kZeroInit, typename Mma, typename A, typename B, typename C>
__device__ __forceinline__ void warpgroup_gemm(Mma& mma, A&& a, const B& b, C& c) {
  warpgroup_issue<kZeroInit>(mma, a, b, c);
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterOperand<A>) warpgroup_fence_operand(a);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    forward_sm90_kernel(const __grid_constant__ ForwardArgs<Traits> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  using TileShape = typename Traits::TileShape;
  constexpr int kStages = Traits::kStages, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int D = Traits::kHeadDim;
  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(shared_bytes);
  const Params& p = args.p;

  const int qb = p.q_blocks - 1 - static_cast<int>(blockIdx.x), head = blockIdx.y, s_index = blockIdx.z;
  const int q0 = qb * kBlockM;
  const Sequence seq = sequence_of(p, s_index);
  if (q0 >= seq.q_len) return;  // past a packed document's blocks; every thread leaves here

  if (threadIdx.x == 0) init_barriers<Traits::kConsumerThreads>(shared.q_full, shared.full, shared.empty);
  __syncthreads();  // the last block-wide barrier: the roles below never meet again
  const BarrierSync<kStages> sync{shared.full, shared.empty};
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutKV{});

  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x != 0) return;
    const int kv_head = head / (p.heads / p.kv_heads);
    const int batch = static_cast<int>(seq.batch);
    Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.q_len, p.head_dim, p.heads, p.batch))(_, _, head, batch);
    Tensor gQ = local_tile(domain_offset(make_coord(static_cast<int>(seq.q_begin), _0{}), mQ),
                           select<0, 2>(TileShape{}), make_coord(qb, _0{}));
    auto tma_q = args.tma_q.get_slice(_0{});
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.q_full, Traits::kQBytes);
    copy(args.tma_q.with(shared.q_full), tma_q.partition_S(gQ), tma_q.partition_D(sQ));

    // (box, box modes..., key block) in global memory; (box, ..., stage) in shared memory.
    auto kv_shape = make_shape(p.k_len, p.head_dim, p.kv_heads, p.batch);
    auto key_blocks = [&](const auto& tma, const auto& m) {
      return tma.get_slice(_0{}).partition_S(local_tile(
          domain_offset(make_coord(static_cast<int>(seq.k_begin), _0{}), m(_, _, kv_head, batch)),
          select<1, 2>(TileShape{}), make_coord(_, _0{})));
    };
    Tensor tKgK = key_blocks(args.tma_k, args.tma_k.get_tma_tensor(kv_shape));
    Tensor tVgV = key_blocks(args.tma_v, args.tma_v.get_tma_tensor(kv_shape));
    Tensor tKsK = args.tma_k.get_slice(_0{}).partition_D(sK);
    Tensor tVsV = args.tma_v.get_slice(_0{}).partition_D(sV);
    RowTileWalk<kBlockN> walk(p, seq, s_index, head, qb);
    produce<kStages>(walk, sync, [&](int channel, int stage, const RowTileWalk<kBlockN>& w) {
      uint64_t& full = shared.full[channel][stage];
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full, Traits::kTileBytes);
      if (channel == kKeys) {
        copy(args.tma_k.with(full), tKgK(_, _, _, w.step.block), tKsK(_, _, _, stage));
      } else {
        copy(args.tma_v.with(full), tVgV(_, _, _, w.step.block), tVsV(_, _, _, stage));
      }
    });
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const int thread = threadIdx.x - 128;
  const ConsumerBarriers barriers;
  const PingPong<ConsumerBarriers> turns{barriers, args.pingpong, thread / 128};
  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thread_qk = mma_qk.get_thread_slice(thread);
  auto thread_pv = mma_pv.get_thread_slice(thread);
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});
  Tensor tSrQ = thread_qk.partition_fragment_A(sQ);   // descriptors: (MMA, M, K)
  Tensor tSrK = thread_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
  Tensor tOrV = thread_pv.partition_fragment_B(sVt);  // (MMA, D, keys, stage)
  Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(TileShape{}));
  Tensor tOrO = partition_fragment_C(mma_pv, select<0, 2>(TileShape{}));
  clear(tOrO);
  // The (row, column) each accumulator element holds, in the same views.
  Tensor scores = make_tensor(tSrS.data(), rows_by_columns(tSrS.layout()));
  Tensor out = make_tensor(tOrO.data(), rows_by_columns(tOrO.layout()));
  Tensor cS = thread_qk.partition_C(make_identity_tensor(select<0, 1>(TileShape{})));
  Tensor cO = thread_pv.partition_C(make_identity_tensor(select<0, 2>(TileShape{})));
  Tensor score_at = make_tensor(cS.data(), rows_by_columns(cS.layout()));
  Tensor out_at = make_tensor(cO.data(), rows_by_columns(cO.layout()));
  constexpr int kRows = size<0>(decltype(scores.layout()){});
  float row_max[kRows], row_sum[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.f;

  cutlass::arch::ClusterBarrier::wait(&shared.q_full, 0);
  RowTileWalk<kBlockN> walk(p, seq, s_index, head, qb);
  Tensor probabilities = make_tensor_like<Element>(tSrS);  // P of the step before, for its PV
  Tensor tOrP = make_tensor(probabilities.data(), accumulator_as_a(probabilities.layout()));
  float correction[kRows];
  auto start = [&](int stage, int previous, const RowTileWalk<kBlockN>&) {
    turns.wait_turn(previous < 0);
    // Each branch issues the scores itself: with one issue before a conditional PV, ptxas
    // serialized every wgmma of the kernel (C7514).
    if (previous >= 0) {
      warpgroup_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
      warpgroup_issue<false>(mma_pv, tOrP, tOrV(_, _, _, previous), tOrO);
      turns.hand_over();
      warpgroup_wait<1>();  // the scores; the product with V stays in flight
    } else {
      warpgroup_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
      turns.hand_over();
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(tSrS);
  };
  auto softmax = [&](const RowTileWalk<kBlockN>& w) {
    const int k0 = w.tile_start();
    const bool masked = block_needs_mask(p, seq, qb, w.step.block);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = -INFINITY;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(scores); ++j) {
        float x = scores(r, j) * p.scale_log2;  // scale first: a negative scale must not flip -inf
        if (masked && !element_visible(p, seq, q0 + get<0>(score_at(r, j)), k0 + get<1>(score_at(r, j)))) {
          x = -INFINITY;
        }
        scores(r, j) = x;
        m = fmaxf(m, x);
      }
      const SoftmaxStep step = online_softmax_step(row_max[r], row_sum[r], quad_max(m));
      correction[r] = step.correction;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(scores); ++j) {
        scores(r, j) = exp2f(scores(r, j) - step.shift);
        row_sum[r] += scores(r, j);  // this lane's part; the quad is summed once at the end
      }
    }
    warpgroup_fence_operand(tSrS);  // done before settle's wait, so it overlaps the product
  };
  auto settle = [&] {
    // The product with the step before's V (none at the first step: waiting for nothing is
    // free, and an unconditional wait lets ptxas see that O is not touched while it runs).
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(tOrP);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(out); ++j) out(r, j) *= correction[r];
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) probabilities(i) = static_cast<Element>(tSrS(i));
  };
  auto last = [&](int stage) {
    turns.finish();
    warpgroup_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
  };
  consume_overlapped<kStages>(walk, sync, start, softmax, settle, last);

  auto* dst = static_cast<typename Traits::Native*>(p.out);
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const int row = q0 + get<0>(out_at(r, 0));
    if (row >= seq.q_len) continue;
    const int64_t out_row = flat_row(seq, p.heads, head, p.q_len, seq.q_begin, row);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that saw no key returns 0
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < size<1>(out); j += 2) {  // columns j and j + 1 are adjacent
      *reinterpret_cast<uint32_t*>(dst + out_row * D + get<1>(out_at(r, j))) =
          ElementOps<typename Traits::Native>::pack(out(r, j) * inv, out(r, j + 1) * inv);
    }
    if (thread % 4 == 0) p.lse[out_row] = row_lse(row_max[r], sum);
  }
#endif
}

}  // namespace sparse_attention::cuda::hopper
