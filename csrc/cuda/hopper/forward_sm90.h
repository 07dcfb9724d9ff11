// Host entry points of the Hopper forward (forward_sm90.cuh). Opt-in until it has passed on a
// GPU: taken only with SPARSE_ATTENTION_HOPPER_KERNELS=1, on a compute capability 9.0 device,
// by a library built with sm_90a code (TORCH_CUDA_ARCH_LIST with 9.0), for the cases it covers.
#pragma once

#include "../params.h"

namespace sparse_attention::cuda::hopper {

// Whether a checked call (p, on device `device`) runs on the Hopper forward.
bool forward_sm90_takes(const Params& p, int device);

// Runs it on `stream` (a cudaStream_t); one instantiation per (dtype, head dim 64 or 128).
template <DType kDType, int kHeadDim>
void run_forward_sm90(const Params& p, void* stream);

void run_forward_sm90(const Params& p, DType dtype, void* stream);

}  // namespace sparse_attention::cuda::hopper
