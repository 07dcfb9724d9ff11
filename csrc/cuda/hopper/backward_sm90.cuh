// Block-sparse attention backward for Hopper (sm_90a), FlashAttention-3's structure, written
// with CuTe like the forward (forward_sm90.cuh). A thread block per (128-key block, kv head,
// sequence) walks the column lists of every query head of the kv head's group, 64 query rows
// per step:
//   warpgroup 0, one thread: the producer. TMA-loads K and V once, then per step the Q and dO
//     tiles into a kStages-deep mbarrier pipeline (pipeline.h, the same loops as the forward).
//   warpgroups 1 and 2: consumers, 64 keys each. S^T = K Q^T and dP^T = V dO^T by SS-wgmma;
//     P^T = exp2(S^T - lse) from the forward's lse (the element rules only on partial
//     blocks), dS^T = P^T (dP^T - delta); dV += P^T dO and dK += dS^T Q by RS-wgmma with P^T
//     and dS^T converted in registers, the dK/dV accumulators resident for the whole column.
//   dQ (unless the deterministic dQ pass runs after this kernel): dS^T goes to shared memory
//     by stmatrix (double buffered), dQ = dS K by SS-wgmma with the 64 x D tile split over the
//     two warpgroups, staged in shared memory and added into the fp32 accumulator by one TMA
//     reduce-add per step (which also clips rows past the tensor's end).
// Block size 128 only; delta comes from the mma.sync delta kernel, launched first.
#pragma once

#include "../backward_kernels.cuh"
#include "forward_sm90.cuh"

namespace sparse_attention::cuda::hopper {

using namespace cute;

template <typename Element_, typename Native_, int kHeadDim_>
struct BackwardTraits : WarpgroupRoles {
  using Element = Element_;
  using Native = Native_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = 128;  // keys: one layout block, 64 per consumer warpgroup
  static constexpr int kBlockM = 64;   // query rows per step: half a layout block
  static_assert(kHeadDim % 64 == 0, "head dims 64 and 128");

  using D = Int<kHeadDim>;
  using M = Int<kBlockM>;
  using N = Int<kBlockN>;
  // S^T and dP^T: (keys, queries) over D, a warpgroup per 64 keys.
  using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<N, M, D>>(),
                                         Layout<Shape<_2, _1, _1>>{}));
  // dV += P^T dO and dK += dS^T Q: (keys, D) over the queries, the A operand in registers.
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<N, D, M>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  // dQ = dS K: (queries, D) over the keys, a warpgroup per half of D; dS is read from the
  // (keys, queries) tile in shared memory, so both operands are MN-major.
  using MmaQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<M, Int<kHeadDim / 2>, N>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;  // rows of 64 or 128 elements, D contiguous
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<N, D>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<M, D, Int<kStages>>{}));  // Q and dO
  // The same bytes as the B operands of the (keys, D) and (queries, D) products: (D, rows).
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<D, M, Int<kStages>>{}, cute::Step<_2, _1, _3>{})));
  using SmemLayoutKt = decltype(composition(SmemLayoutKV{}, make_ordered_layout(Shape<D, N>{}, cute::Step<_2, _1>{})));
  // dS as (queries, keys, buffer) with the queries contiguous: the consumers write dS^T rows.
  using SmemLayoutDS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<M, N, _2>{}));
  // The same bytes as (keys, queries, buffer), as the score registers hold them: each key's
  // queries are contiguous, so stmatrix stores them without a transpose.
  using SmemLayoutDSt = decltype(composition(
      SmemLayoutDS{}, make_ordered_layout(Shape<N, M, _2>{}, cute::Step<_2, _1, _3>{})));
  using StoreDS = decltype(make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, MmaSdP{}));

  // The dQ tile in fp32 for the TMA reduce-add, swizzled so that the accumulator stores do not
  // collide on banks.
  using SmemLayoutQAccum = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<float>{}, Shape<M, D>{}));

  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTileBytes = kBlockM * kHeadDim * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> grad_out;
    cute::array_aligned<Element, cosize_v<SmemLayoutDS>, 1024> ds;
    cute::array_aligned<float, cosize_v<SmemLayoutQAccum>, 1024> dq;
    uint64_t kv_full;
    uint64_t full[2][kStages];   // [channel: Q, dO][stage]
    uint64_t empty[2][kStages];
  };
  static constexpr size_t kSharedBytes = sizeof(SharedStorage);
  static_assert(kSharedBytes <= 227 * 1024, "one thread block's tiles fit in shared memory");

  using GmemTensor = typename ForwardTraits<Element, Native, kHeadDim>::GmemTensor;
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutKV{}, Shape<N, D>{}, _1{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}), Shape<M, D>{}, _1{}));
  // The fp32 dQ accumulator [batch, heads, rows, D] as (rows, D, heads, batch).
  using AccumTensor = decltype(make_tensor(make_gmem_ptr(static_cast<float*>(nullptr)),
                                           typename ForwardTraits<Element, Native, kHeadDim>::GmemLayout{}));
  using TmaQAccum = decltype(make_tma_copy(SM90_TMA_REDUCE_ADD{}, AccumTensor{}, SmemLayoutQAccum{}, Shape<M, D>{}, _1{}));
};

template <typename Traits>
struct BackwardArgs {
  Params p;
  typename Traits::TmaKV tma_k, tma_v;
  typename Traits::TmaQ tma_q, tma_grad_out;
  typename Traits::TmaQAccum tma_grad_q;  // reduce-add into p.grad_q_accum
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    backward_sm90_kernel(const __grid_constant__ BackwardArgs<Traits> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  using Native = typename Traits::Native;
  using M = typename Traits::M;
  using N = typename Traits::N;
  using D = typename Traits::D;
  constexpr int kStages = Traits::kStages, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  using Walk = ColumnTileWalk<kBlockN, kBlockM>;
  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(shared_bytes);
  const Params& p = args.p;

  const int kb = blockIdx.x, kv_head = blockIdx.y, s_index = blockIdx.z;
  const int k0 = kb * kBlockN;
  const Sequence seq = sequence_of(p, s_index);
  if (k0 >= seq.k_len) return;  // past a packed document's blocks; every thread leaves here

  if (threadIdx.x == 0) init_barriers<Traits::kConsumerThreads>(shared.kv_full, shared.full, shared.empty);
  __syncthreads();  // the last block-wide barrier
  const BarrierSync<kStages> sync{shared.full, shared.empty};
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(shared.grad_out.data()), typename Traits::SmemLayoutQ{});
  const int batch = static_cast<int>(seq.batch);

  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x != 0) return;
    Walk walk(p, seq, s_index, kv_head, kb);
    if (walk.done) return;  // the consumers wait for nothing either
    // K and V of the key block, once.
    auto kv_shape = make_shape(p.k_len, p.head_dim, p.kv_heads, p.batch);
    auto key_block = [&](const auto& tma) {
      Tensor m = tma.get_tma_tensor(kv_shape)(_, _, kv_head, batch);
      return tma.get_slice(_0{}).partition_S(local_tile(
          domain_offset(make_coord(static_cast<int>(seq.k_begin), _0{}), m), Shape<N, D>{}, make_coord(kb, _0{})));
    };
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.kv_full, 2 * Traits::kKVBytes);
    copy(args.tma_k.with(shared.kv_full), key_block(args.tma_k), args.tma_k.get_slice(_0{}).partition_D(sK));
    copy(args.tma_v.with(shared.kv_full), key_block(args.tma_v), args.tma_v.get_slice(_0{}).partition_D(sV));

    // Per step the Q and dO tiles of the step's query head and rows.
    auto q_shape = make_shape(p.q_len, p.head_dim, p.heads, p.batch);
    produce<kStages>(walk, sync, [&](int channel, int stage, const Walk& w) {
      uint64_t& full = shared.full[channel][stage];
      const auto& tma = channel == kQueries ? args.tma_q : args.tma_grad_out;
      Tensor m = tma.get_tma_tensor(q_shape)(_, _, w.query_head(), batch);
      Tensor tile = local_tile(domain_offset(make_coord(static_cast<int>(seq.q_begin), _0{}), m),
                               Shape<M, D>{}, make_coord(w.tile_start() / kBlockM, _0{}));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full, Traits::kTileBytes);
      auto slice = tma.get_slice(_0{});
      copy(tma.with(full), slice.partition_S(tile), slice.partition_D((channel == kQueries ? sQ : sdO)(_, _, stage)));
    });
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const int thread = threadIdx.x - 128;
  typename Traits::MmaSdP mma_sdp;
  typename Traits::MmaKV mma_kv;
  typename Traits::MmaQ mma_q;
  auto thread_sdp = mma_sdp.get_thread_slice(thread);
  auto thread_kv = mma_kv.get_thread_slice(thread);
  auto thread_q = mma_q.get_thread_slice(thread);
  Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(shared.grad_out.data()), typename Traits::SmemLayoutQt{});
  Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKt{});
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutDS{});
  typename Traits::StoreDS store_ds;
  auto thread_store_ds = store_ds.get_thread_slice(thread);
  Tensor tdSsdS = thread_store_ds.partition_D(
      make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutDSt{}));  // (CPY, keys, queries, buffer)
  Tensor tSrK = thread_sdp.partition_fragment_A(sK);     // descriptors: (MMA, keys, D)
  Tensor tdPrV = thread_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thread_sdp.partition_fragment_B(sQ);     // (MMA, queries, D, stage)
  Tensor tdPrdO = thread_sdp.partition_fragment_B(sdO);
  Tensor tdVrdO = thread_kv.partition_fragment_B(sdOt);  // (MMA, D, queries, stage)
  Tensor tdKrQ = thread_kv.partition_fragment_B(sQt);
  Tensor tdQrdS = thread_q.partition_fragment_A(sdS);    // (MMA, queries, keys, buffer)
  Tensor tdQrK = thread_q.partition_fragment_B(sKt);     // (MMA, D, keys)
  Tensor sdQ = make_tensor(make_smem_ptr(shared.dq.data()), typename Traits::SmemLayoutQAccum{});
  Tensor tdQsdQ = thread_q.partition_C(sdQ);
  auto q_shape = make_shape(p.q_len, p.head_dim, p.heads, p.batch);
  Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<N, D>{});
  Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<N, D>{});
  clear(tdVrdV);
  clear(tdKrdK);
  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<N, M>{});
  Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<N, M>{});
  // The (key, query) each score element holds, and its (row, column) view.
  Tensor cS = thread_sdp.partition_C(make_identity_tensor(Shape<N, M>{}));
  Tensor scores = make_tensor(tSrS.data(), rows_by_columns(tSrS.layout()));
  Tensor grads = make_tensor(tdPrdP.data(), rows_by_columns(tdPrdP.layout()));
  Tensor score_at = make_tensor(cS.data(), rows_by_columns(cS.layout()));
  constexpr int kRows = size<0>(decltype(scores.layout()){}), kColumns = size<1>(decltype(scores.layout()){});

  Walk walk(p, seq, s_index, kv_head, kb);
  if (!walk.done) cutlass::arch::ClusterBarrier::wait(&shared.kv_full, 0);
  int buffer = 0;  // of dS: the other warpgroup may still read the last step's
  auto score_tile = [&](int stage, const Walk&) {
    warpgroup_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);  // waited for with dP^T
  };
  auto gradient_tile = [&](int stage, const Walk& w) {
    warpgroup_issue<true>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tdPrdP);
    const int head = w.query_head(), q0 = w.tile_start();
    const int64_t row0 = flat_row(seq, p.heads, head, p.q_len, seq.q_begin, 0);
    const bool masked = block_needs_mask(p, seq, w.step.block, kb);
    // P^T = exp2(S^T - lse), rounded to the input type as the A operand of dV += P^T dO, and
    // dS^T = P^T (dP^T - delta) in place of dP^T from the rounded P^T (as the mma.sync kernel
    // does: the fp32 scores die at once, which leaves the registers to the dK and dV
    // accumulators); a query column at a time, its lse and delta read where used (L1 hits).
    Tensor probabilities = make_tensor_like<Element>(tSrS);
    Tensor rounded = make_tensor(probabilities.data(), rows_by_columns(probabilities.layout()));
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kColumns; ++j) {
      const int q = q0 + get<1>(score_at(0, j));
      const float lse2 = lse_base2(p, row0 + q, q < seq.q_len);  // +inf past the end: P = 0
      const float delta = q < seq.q_len ? p.delta[row0 + q] : 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float x = scores(r, j) * p.scale_log2;  // scale first: a negative scale must not flip -inf
        if (masked && !element_visible(p, seq, q, k0 + get<0>(score_at(r, j)))) x = -INFINITY;
        rounded(r, j) = static_cast<Element>(exp2f(x - lse2));
        grads(r, j) = static_cast<float>(rounded(r, j)) * (grads(r, j) - delta);
      }
    }
    Tensor score_grads = make_tensor_like<Element>(tdPrdP);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdPrdP); ++i) score_grads(i) = static_cast<Element>(tdPrdP(i));
    // dV += P^T dO and dK += dS^T Q, and meanwhile dS^T into shared memory for dQ (the
    // products only read the same registers).
    Tensor tdVrP = make_tensor(probabilities.data(), accumulator_as_a(probabilities.layout()));
    Tensor tdKrdS = make_tensor(score_grads.data(), accumulator_as_a(score_grads.layout()));
    warpgroup_issue<false>(mma_kv, tdVrP, tdVrdO(_, _, _, stage), tdVrdV);
    warpgroup_issue<false>(mma_kv, tdKrdS, tdKrQ(_, _, _, stage), tdKrdK);
    if (!p.grad_q_pass) copy(store_ds, thread_store_ds.retile_S(score_grads), tdSsdS(_, _, _, buffer));
    warpgroup_wait<0>();
    warpgroup_fence_operand(tdVrdV);
    warpgroup_fence_operand(tdKrdK);
    warpgroup_fence_operand(probabilities);
    warpgroup_fence_operand(score_grads);
    if (p.grad_q_pass) return;

    // dQ += dS K over both warpgroups' dS^T rows, one product over all keys. The thread that
    // issues the reduce-adds first waits until the last one has read sdQ; the barrier tells
    // everyone (and that every dS row has landed).
    cutlass::arch::fence_view_async_shared();  // generic-proxy stores, read by wgmma
    if (thread == 0) tma_store_wait<0>();
    cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, 0);
    Tensor tdQrdQ = partition_fragment_C(mma_q, Shape<M, D>{});
    warpgroup_gemm<true>(mma_q, tdQrdS(_, _, _, buffer), tdQrK, tdQrdQ);
    buffer ^= 1;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdQrdQ); i += 2) {  // elements i, i + 1: adjacent columns
      // A shared-memory address: the swizzled layout's pointer arithmetic loses the address
      // space, which would make these generic stores with 64-bit addresses.
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(smem_address(&tdQsdQ(i))), "f"(tdQrdQ(i)),
                   "f"(tdQrdQ(i + 1)));
    }
    tma_store_fence();  // generic-proxy stores, read by the TMA unit
    cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, 1);
    if (thread == 0) {  // rows past the sequence's end add zeros (P = 0), past the tensor's none
      Tensor m = args.tma_grad_q.get_tma_tensor(q_shape)(_, _, head, batch);
      Tensor tile = local_tile(domain_offset(make_coord(static_cast<int>(seq.q_begin), _0{}), m),
                               Shape<M, D>{}, make_coord(q0 / kBlockM, _0{}));
      auto slice = args.tma_grad_q.get_slice(_0{});
      copy(args.tma_grad_q, slice.partition_S(sdQ), slice.partition_D(tile));
      tma_store_arrive();
    }
  };
  consume<kStages>(walk, sync, score_tile, gradient_tile);
  if (thread == 0) tma_store_wait<0>();  // shared memory stays until the last reduce has read it

  // dK = scale * dS^T Q and dV as summed; keys past the sequence's end are not written.
  Tensor cKV = thread_kv.partition_C(make_identity_tensor(Shape<N, D>{}));
  Tensor dk = make_tensor(tdKrdK.data(), rows_by_columns(tdKrdK.layout()));
  Tensor dv = make_tensor(tdVrdV.data(), rows_by_columns(tdVrdV.layout()));
  Tensor kv_at = make_tensor(cKV.data(), rows_by_columns(cKV.layout()));
  auto* grad_k = static_cast<Native*>(p.grad_k);
  auto* grad_v = static_cast<Native*>(p.grad_v);
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < size<0>(dk); ++r) {
    const int key = k0 + get<0>(kv_at(r, 0));
    if (key >= seq.k_len) continue;
    const int64_t row = flat_row(seq, p.kv_heads, kv_head, p.k_len, seq.k_begin, key) * p.head_dim;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < size<1>(dk); j += 2) {
      const int d = get<1>(kv_at(r, j));
      *reinterpret_cast<uint32_t*>(grad_k + row + d) =
          ElementOps<Native>::pack(dk(r, j) * p.scale, dk(r, j + 1) * p.scale);
      *reinterpret_cast<uint32_t*>(grad_v + row + d) = ElementOps<Native>::pack(dv(r, j), dv(r, j + 1));
    }
  }
#endif
}

}  // namespace sparse_attention::cuda::hopper
