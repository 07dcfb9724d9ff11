// Launch templates: pick the kernel traits for a block size, size the grid and shared memory,
// name the launch for nsys (header-only NVTX v3) and check every CUDA call. Included only by
// the generated instantiations/*.cu, one (dtype, head dim) each.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "backward_kernels.cuh"
#include "forward_kernel.cuh"
#include "kernel_traits.h"
#include "params.h"
#include "supported_cases.h"

namespace sparse_attention::cuda {

template <DType kDType>
struct ElementOf;
template <>
struct ElementOf<DType::kHalf> {
  using type = __half;
  static constexpr const char* name = "fp16";
};
template <>
struct ElementOf<DType::kBFloat16> {
  using type = __nv_bfloat16;
  static constexpr const char* name = "bf16";
};

// An NVTX range for the lifetime of the object, e.g. "sparse_attention.forward bf16 d128 bs64".
class NvtxRange {
 public:
  explicit NvtxRange(const std::string& name) { nvtxRangePushA(name.c_str()); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// Launches kernel(args) after raising its shared-memory limit where needed (p names the case
// in errors).
template <typename Kernel, typename Args>
void launch_with(Kernel kernel, dim3 grid, int threads, size_t shared_bytes, cudaStream_t stream,
                 const Params& p, const Args& args) {
  if (shared_bytes > 48 * 1024) {
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(shared_bytes <= static_cast<size_t>(limit), "q: head_dim ", p.head_dim,
                      " with block_size ", p.block_size, " needs ", shared_bytes / 1024,
                      " KB of shared memory per thread block; this GPU offers ", limit / 1024,
                      " KB (A100 and H100 offer 163 and 227)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  kernel<<<grid, threads, shared_bytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int threads, size_t shared_bytes, cudaStream_t stream,
            const Params& p) {
  launch_with(kernel, grid, threads, shared_bytes, stream, p, p);
}

// Whether SPARSE_ATTENTION_CUDA_FA2_TILING=1 asks for the FlashAttention-2 tiling of the
// forward (forward_kernel_fa2), opt-in until it has run on a GPU. Read on every call (a getenv
// costs far less than a launch), so that a benchmark can time both tilings in one process.
inline bool fa2_tiling_enabled() {
  const char* value = std::getenv("SPARSE_ATTENTION_CUDA_FA2_TILING");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

template <DType kDType, int kHeadDim, int kBlockSize>
void launch_forward(const Params& p, cudaStream_t stream) {
  using Traits = KernelTraits<typename ElementOf<kDType>::type, kHeadDim, kBlockSize>;
  using Fa2 = RowTiling<Traits, 2>;
  const dim3 grid(p.q_blocks, p.heads, p.sequences);
  // The FA2 tiling folds the scale into the exponent, which needs a positive scale.
  if (fa2_tiling_enabled() && p.scale_log2 > 0.f) {
    launch(forward_kernel_fa2<Traits>, grid, Fa2::kThreads, Fa2::kForwardSmem, stream, p);
  } else {
    launch(forward_kernel<Traits>, grid, Traits::kRowThreads, Traits::kForwardSmem, stream, p);
  }
}

// delta = rowsum(dO * O) - dlse, the first kernel of every backward (the Hopper one's too).
template <DType kDType, int kHeadDim>
void launch_delta(const Params& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  launch(delta_kernel<typename ElementOf<kDType>::type, kHeadDim>,
         dim3(static_cast<unsigned>((rows + 3) / 4)), 128, 0, stream, p);
}

// The deterministic dQ pass over the rows, after a dK/dV kernel that left dQ out.
template <DType kDType, int kHeadDim, int kBlockSize>
void launch_grad_q_pass(const Params& p, cudaStream_t stream) {
  using Traits = KernelTraits<typename ElementOf<kDType>::type, kHeadDim, kBlockSize>;
  launch(grad_q_kernel<Traits>, dim3(p.q_blocks, p.heads, p.sequences), Traits::kRowThreads,
         Traits::kGradQSmem, stream, p);
}

template <DType kDType, int kHeadDim, int kBlockSize>
void launch_backward(const Params& p, cudaStream_t stream) {
  using Traits = KernelTraits<typename ElementOf<kDType>::type, kHeadDim, kBlockSize>;
  launch_delta<kDType, kHeadDim>(p, stream);
  // Before the dQ pass the dK/dV kernel stages no dS^T: it runs without that shared memory.
  launch(grad_kv_kernel<Traits>, dim3(p.k_blocks * Traits::kSubTiles, p.kv_heads, p.sequences),
         Traits::kColThreads, p.grad_q_pass ? Traits::kGradKVBeforeDqPassSmem : Traits::kGradKVSmem,
         stream, p);
  if (p.grad_q_pass) launch_grad_q_pass<kDType, kHeadDim, kBlockSize>(p, stream);
}

inline std::string range_name(const char* op, const char* dtype, int head_dim, int block_size) {
  return std::string("sparse_attention.") + op + " " + dtype + " d" + std::to_string(head_dim) +
         " bs" + std::to_string(block_size);
}

// Calls launch(std::integral_constant<int, block size>) for the call's compiled block size.
template <typename Launch>
void with_block_size(const Params& p, const Launch& launch) {
  switch (p.block_size) {
#define SPARSE_ATTENTION_BLOCK_CASE(B) \
  case B: return launch(std::integral_constant<int, B>{});
    SPARSE_ATTENTION_CUDA_BLOCK_SIZES(SPARSE_ATTENTION_BLOCK_CASE)
#undef SPARSE_ATTENTION_BLOCK_CASE
    default: TORCH_CHECK_VALUE(false, "block_size: expected one of ", kBlockSizesText, " on CUDA, got ",
                               p.block_size);
  }
}

template <DType kDType, int kHeadDim>
void run_forward(const Params& p, void* stream) {
  const NvtxRange range(range_name("forward", ElementOf<kDType>::name, kHeadDim, p.block_size));
  with_block_size(p, [&](auto block) {
    launch_forward<kDType, kHeadDim, decltype(block)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

template <DType kDType, int kHeadDim>
void run_backward(const Params& p, void* stream) {
  const NvtxRange range(range_name(p.grad_q_pass ? "backward(dq pass)" : "backward(atomic dq)",
                                   ElementOf<kDType>::name, kHeadDim, p.block_size));
  with_block_size(p, [&](auto block) {
    launch_backward<kDType, kHeadDim, decltype(block)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

template <DType kDType, int kHeadDim>
void run_delta(const Params& p, void* stream) {
  launch_delta<kDType, kHeadDim>(p, static_cast<cudaStream_t>(stream));
}

template <DType kDType, int kHeadDim>
void run_grad_q_pass(const Params& p, void* stream) {
  with_block_size(p, [&](auto block) {
    launch_grad_q_pass<kDType, kHeadDim, decltype(block)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace sparse_attention::cuda
