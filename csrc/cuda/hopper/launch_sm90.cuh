// Host side of the Hopper forward: the TMA descriptors of Q, K and V, and the launch. Included
// by the per-dtype instantiation files.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "../launch.cuh"
#include "forward_sm90.cuh"
#include "forward_sm90.h"

namespace sparse_attention::cuda::hopper {

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

template <DType kDType, int kHeadDim>
void run_forward_sm90(const Params& p, void* stream) {
  using Native = typename ElementOf<kDType>::type;
  using Element = std::conditional_t<kDType == DType::kHalf, cutlass::half_t, cutlass::bfloat16_t>;
  using Traits = ForwardTraits<Element, Native, kHeadDim>;
  const auto kernel = forward_sm90_kernel<Traits>;
  // A library built without sm_90a code holds only the empty body for this device.
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  TORCH_CHECK(attributes.binaryVersion == 90, "SPARSE_ATTENTION_HOPPER_KERNELS=1: this build of ",
              "sparse_attention has no sm_90a code for the Hopper forward (device code version ",
              attributes.binaryVersion, "); rebuild with TORCH_CUDA_ARCH_LIST including 9.0");
  const int kv_rows = p.k_len;
  const ForwardArgs<Traits> args{
      p,
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Traits>(p.q, p.q_len, p.heads, p.batch),
                    typename Traits::SmemLayoutQ{}, select<0, 2>(typename Traits::TileShape{}), _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Traits>(p.k, kv_rows, p.kv_heads, p.batch),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), select<1, 2>(typename Traits::TileShape{}), _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Traits>(p.v, kv_rows, p.kv_heads, p.batch),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), select<1, 2>(typename Traits::TileShape{}), _1{})};
  const NvtxRange range(range_name("forward(sm90)", ElementOf<kDType>::name, kHeadDim, p.block_size));
  launch_with(kernel, dim3(p.q_blocks, p.heads, p.sequences), Traits::kThreads, Traits::kSharedBytes,
              static_cast<cudaStream_t>(stream), p, args);
}

}  // namespace sparse_attention::cuda::hopper
