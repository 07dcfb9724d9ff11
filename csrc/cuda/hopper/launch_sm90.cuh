// Host side of the Hopper kernels: the TMA descriptors of the operands, and the launches.
// Included by the per-dtype instantiation files.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../launch.cuh"
#include "backward_sm90.cuh"
#include "forward_sm90.cuh"
#include "kernels_sm90.h"

namespace sparse_attention::cuda {
// Compiled with the mma.sync backward (instantiations/backward_*.cu), not again here.
#define SPARSE_ATTENTION_BACKWARD_PIECES(D)                                      \
  extern template void run_delta<DType::kHalf, D>(const Params&, void*);         \
  extern template void run_delta<DType::kBFloat16, D>(const Params&, void*);     \
  extern template void run_grad_q_pass<DType::kHalf, D>(const Params&, void*);   \
  extern template void run_grad_q_pass<DType::kBFloat16, D>(const Params&, void*);
SPARSE_ATTENTION_CUDA_HEAD_DIMS(SPARSE_ATTENTION_BACKWARD_PIECES)
#undef SPARSE_ATTENTION_BACKWARD_PIECES
}  // namespace sparse_attention::cuda

namespace sparse_attention::cuda::hopper {

template <DType kDType>
using CuteElement = std::conditional_t<kDType == DType::kHalf, cutlass::half_t, cutlass::bfloat16_t>;

// An operand as a (rows, head dim, heads, batch) tensor for TMA. The host check has given every
// dimension longer than 1 a non-zero stride; a length-1 dimension gets the row stride, so that
// the descriptor never holds a zero stride.
template <typename Traits>
typename Traits::GmemTensor gmem_tensor(const Operand& op, int rows, int heads, int batch) {
  const auto stride = [&](int64_t s, int extent) { return extent == 1 ? op.row_stride : s; };
  return make_tensor(make_gmem_ptr(static_cast<const typename Traits::Element*>(op.data)),
                     make_layout(make_shape(rows, Traits::kHeadDim, heads, batch),
                                 make_stride(op.row_stride, _1{}, stride(op.head_stride, heads),
                                             stride(op.batch_stride, batch))));
}

// The fp32 dQ accumulator, contiguous [batch, heads, rows, D], as (rows, D, heads, batch).
// Where the dQ pass runs instead there is none and the descriptor is never used, but it must
// still encode: one row over grad_q's (device, aligned) memory.
template <typename Traits>
typename Traits::AccumTensor accumulator_tensor(const Params& p) {
  const int64_t d = Traits::kHeadDim;
  if (!p.grad_q_accum) {
    return make_tensor(make_gmem_ptr(static_cast<float*>(p.grad_q)),
                       make_layout(make_shape(1, Traits::kHeadDim, 1, 1), make_stride(d, _1{}, d, d)));
  }
  const int64_t rows = p.q_len;
  return make_tensor(make_gmem_ptr(p.grad_q_accum),
                     make_layout(make_shape(p.q_len, Traits::kHeadDim, p.heads, p.batch),
                                 make_stride(d, _1{}, rows * d, p.heads * rows * d)));
}

// A TMA load of `op`'s tiles of shape `tile` into shared memory laid out as `smem`.
template <typename Traits, typename SmemLayout, typename Tile>
auto tma_load(const Operand& op, int rows, int heads, int batch, SmemLayout smem, Tile tile) {
  return make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Traits>(op, rows, heads, batch), smem, tile, _1{});
}

// A library built without sm_90a code holds only the empty body for this device.
template <typename Kernel>
void check_sm90_code(Kernel kernel, const char* what) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  TORCH_CHECK(attributes.binaryVersion == 90, "the Hopper kernels were asked for, but this build of ",
              "sparse_attention has no sm_90a code for the Hopper ", what, " (device code version ",
              attributes.binaryVersion, "); rebuild with TORCH_CUDA_ARCH_LIST including 9.0 and ",
              "nvidia-cutlass installed");
}

// The forward's ping-pong of its consumer warpgroups (PingPong), on unless
// SPARSE_ATTENTION_HOPPER_PINGPONG=0: a tuning switch, read per call so that a benchmark can
// time both.
inline bool pingpong_enabled() {
  const char* value = std::getenv("SPARSE_ATTENTION_HOPPER_PINGPONG");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

template <DType kDType, int kHeadDim>
void run_forward_sm90(const Params& p, void* stream) {
  using Traits = ForwardTraits<CuteElement<kDType>, typename ElementOf<kDType>::type, kHeadDim>;
  const auto kernel = forward_sm90_kernel<Traits>;
  check_sm90_code(kernel, "forward");
  const auto tile_q = select<0, 2>(typename Traits::TileShape{});
  const auto tile_kv = select<1, 2>(typename Traits::TileShape{});
  const auto smem_kv = take<0, 2>(typename Traits::SmemLayoutKV{});
  const ForwardArgs<Traits> args{
      p, tma_load<Traits>(p.q, p.q_len, p.heads, p.batch, typename Traits::SmemLayoutQ{}, tile_q),
      tma_load<Traits>(p.k, p.k_len, p.kv_heads, p.batch, smem_kv, tile_kv),
      tma_load<Traits>(p.v, p.k_len, p.kv_heads, p.batch, smem_kv, tile_kv), pingpong_enabled()};
  const NvtxRange range(range_name("forward(sm90)", ElementOf<kDType>::name, kHeadDim, p.block_size));
  launch_with(kernel, dim3(p.q_blocks, p.heads, p.sequences), Traits::kThreads, Traits::kSharedBytes,
              static_cast<cudaStream_t>(stream), p, args);
}

template <DType kDType, int kHeadDim>
void run_backward_sm90(const Params& p, void* stream) {
  using Traits = BackwardTraits<CuteElement<kDType>, typename ElementOf<kDType>::type, kHeadDim>;
  const auto kernel = backward_sm90_kernel<Traits>;
  check_sm90_code(kernel, "backward");
  using KV = Shape<typename Traits::N, typename Traits::D>;
  using Q = Shape<typename Traits::M, typename Traits::D>;
  const auto smem_q = take<0, 2>(typename Traits::SmemLayoutQ{});
  const BackwardArgs<Traits> args{
      p, tma_load<Traits>(p.k, p.k_len, p.kv_heads, p.batch, typename Traits::SmemLayoutKV{}, KV{}),
      tma_load<Traits>(p.v, p.k_len, p.kv_heads, p.batch, typename Traits::SmemLayoutKV{}, KV{}),
      tma_load<Traits>(p.q, p.q_len, p.heads, p.batch, smem_q, Q{}),
      tma_load<Traits>(p.grad_out, p.q_len, p.heads, p.batch, smem_q, Q{}),
      make_tma_copy(SM90_TMA_REDUCE_ADD{}, accumulator_tensor<Traits>(p), typename Traits::SmemLayoutQAccum{}, Q{}, _1{})};
  const NvtxRange range(range_name(p.grad_q_pass ? "backward(sm90, dq pass)" : "backward(sm90, atomic dq)",
                                   ElementOf<kDType>::name, kHeadDim, p.block_size));
  const auto s = static_cast<cudaStream_t>(stream);
  run_delta<kDType, kHeadDim>(p, stream);
  launch_with(kernel, dim3(p.k_blocks, p.kv_heads, p.sequences), Traits::kThreads, Traits::kSharedBytes, s,
              p, args);
  if (p.grad_q_pass) run_grad_q_pass<kDType, kHeadDim>(p, stream);  // the deterministic dQ
}

}  // namespace sparse_attention::cuda::hopper
