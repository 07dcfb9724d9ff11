// Host entry points of the Hopper kernels (forward_sm90.cuh, backward_sm90.cuh). Opt-in until
// they have passed on a GPU: taken only when asked for (SPARSE_ATTENTION_HOPPER_KERNELS=1 or
// the call's cuda_kernels='hopper'), on a compute capability 9.0 device, by a library built with sm_90a
// code (TORCH_CUDA_ARCH_LIST with 9.0 and the nvidia-cutlass headers), for the cases they cover.
#pragma once

#include "../../kernel_choice.h"
#include "../params.h"

namespace sparse_attention::cuda::hopper {

// Whether a checked call (p, on device `device`) runs on the Hopper kernels under the call's
// choice (an error for kHopper where they cannot); forward and backward cover the same cases.
bool sm90_takes(const Params& p, int device, CudaKernels choice);

// Run on `stream` (a cudaStream_t); one instantiation per (dtype, head dim 64 or 128).
template <DType kDType, int kHeadDim>
void run_forward_sm90(const Params& p, void* stream);
template <DType kDType, int kHeadDim>
void run_backward_sm90(const Params& p, void* stream);

void run_forward_sm90(const Params& p, DType dtype, void* stream);
void run_backward_sm90(const Params& p, DType dtype, void* stream);

}  // namespace sparse_attention::cuda::hopper
