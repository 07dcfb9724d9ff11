// Which calls the Hopper kernels take (kernels_sm90.h), and the dispatch on dtype and head dim.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "kernels_sm90.h"

namespace sparse_attention::cuda::hopper {

namespace {

#if defined(SPARSE_ATTENTION_SM90A)
bool requested_by_environment() {
  const char* value = std::getenv("SPARSE_ATTENTION_HOPPER_KERNELS");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// TMA descriptors take no zero stride: a dimension longer than 1 must not be broadcast.
bool tma_strides(const Operand& op, int heads, int batch) {
  return op.row_stride > 0 && (heads == 1 || op.head_stride > 0) && (batch == 1 || op.batch_stride > 0);
}
#endif

// Why the Hopper kernels cannot run a checked call, or nullptr when they can.
const char* refusal(const Params& p, int device) {
#if defined(SPARSE_ATTENTION_SM90A)
  if (p.block_size != 128) return "they take block_size 128 only";
  if (p.head_dim != 64 && p.head_dim != 128) return "they take head_dim 64 and 128 only";
  if (p.q_len == 0 || p.k_len == 0) return "a TMA descriptor has no empty dimension (q or k has no rows)";
  if (!tma_strides(p.q, p.heads, p.batch) || !tma_strides(p.k, p.kv_heads, p.batch) ||
      !tma_strides(p.v, p.kv_heads, p.batch) || (p.grad_out.data && !tma_strides(p.grad_out, p.heads, p.batch))) {
    return "an operand is broadcast (stride 0) along heads or batch, which TMA descriptors cannot express";
  }
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0 ? nullptr : "they need a compute capability 9.0 GPU (H100, H200)";
#else
  (void)p, (void)device;
  return "this build has none (they need TORCH_CUDA_ARCH_LIST with 9.0 and nvidia-cutlass at build time)";
#endif
}

}  // namespace

bool sm90_takes(const Params& p, int device, CudaKernels choice) {
  if (choice == CudaKernels::kMma) return false;
  const char* why_not = refusal(p, device);
  TORCH_CHECK_VALUE(choice != CudaKernels::kHopper || why_not == nullptr,
                    "cuda_kernels='hopper': the Hopper kernels cannot run this call: ", why_not);
#if defined(SPARSE_ATTENTION_SM90A)
  return why_not == nullptr && (choice == CudaKernels::kHopper || requested_by_environment());
#else
  return false;
#endif
}

namespace {

// Calls run<dtype, head dim>(p, stream) for the instantiated cases.
template <template <DType, int> class Run>
void dispatch(const Params& p, DType dtype, void* stream) {
#if defined(SPARSE_ATTENTION_SM90A)
  const bool half = dtype == DType::kHalf;
  if (p.head_dim == 64) {
    half ? Run<DType::kHalf, 64>::run(p, stream) : Run<DType::kBFloat16, 64>::run(p, stream);
  } else {
    half ? Run<DType::kHalf, 128>::run(p, stream) : Run<DType::kBFloat16, 128>::run(p, stream);
  }
#else
  (void)p, (void)dtype, (void)stream;
  TORCH_CHECK(false, "sparse_attention was built without the Hopper kernels");
#endif
}

template <DType kDType, int kHeadDim>
struct Forward {
  static void run(const Params& p, void* stream) { run_forward_sm90<kDType, kHeadDim>(p, stream); }
};
template <DType kDType, int kHeadDim>
struct Backward {
  static void run(const Params& p, void* stream) { run_backward_sm90<kDType, kHeadDim>(p, stream); }
};

}  // namespace

void run_forward_sm90(const Params& p, DType dtype, void* stream) { dispatch<Forward>(p, dtype, stream); }
void run_backward_sm90(const Params& p, DType dtype, void* stream) { dispatch<Backward>(p, dtype, stream); }

}  // namespace sparse_attention::cuda::hopper
