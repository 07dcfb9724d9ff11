// Which calls the Hopper forward takes (forward_sm90.h).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "forward_sm90.h"

namespace sparse_attention::cuda::hopper {

#if defined(SPARSE_ATTENTION_SM90A)
namespace {

bool requested() {
  const char* value = std::getenv("SPARSE_ATTENTION_HOPPER_KERNELS");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// TMA descriptors take no zero stride: a dimension longer than 1 must not be broadcast.
bool tma_strides(const Operand& op, int heads, int batch) {
  return op.row_stride > 0 && (heads == 1 || op.head_stride > 0) && (batch == 1 || op.batch_stride > 0);
}

}  // namespace
#endif

bool forward_sm90_takes(const Params& p, int device) {
#if defined(SPARSE_ATTENTION_SM90A)
  if (!requested() || p.block_size != 128 || (p.head_dim != 64 && p.head_dim != 128)) return false;
  if (p.q_len == 0 || p.k_len == 0) return false;  // a TMA descriptor has no empty dimension
  if (!tma_strides(p.q, p.heads, p.batch) || !tma_strides(p.k, p.kv_heads, p.batch) ||
      !tma_strides(p.v, p.kv_heads, p.batch)) {
    return false;
  }
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
#else
  (void)p;
  (void)device;
  return false;
#endif
}

void run_forward_sm90(const Params& p, DType dtype, void* stream) {
#if defined(SPARSE_ATTENTION_SM90A)
  const bool half = dtype == DType::kHalf;
  if (p.head_dim == 64) {
    half ? run_forward_sm90<DType::kHalf, 64>(p, stream) : run_forward_sm90<DType::kBFloat16, 64>(p, stream);
  } else {
    half ? run_forward_sm90<DType::kHalf, 128>(p, stream) : run_forward_sm90<DType::kBFloat16, 128>(p, stream);
  }
#else
  (void)p, (void)dtype, (void)stream;
  TORCH_CHECK(false, "sparse_attention was built without the Hopper kernels");
#endif
}

}  // namespace sparse_attention::cuda::hopper
