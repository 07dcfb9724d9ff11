// The ops' cuda_kernels argument: which CUDA kernels run a call. No torch types, so that the
// CUDA kernels' headers can take it (input_checks.h parses it from the op's string).
#pragma once

namespace sparse_attention {

// kAuto: the default kernels (the mma.sync ones; the opt-in Hopper kernels where
// SPARSE_ATTENTION_HOPPER_KERNELS=1 and they cover the call). kHopper: the Hopper kernels, an
// error where they cannot run the call. kMma: the mma.sync kernels. Checked on every device;
// the CPU kernels ignore it.
enum class CudaKernels { kAuto, kHopper, kMma };

}  // namespace sparse_attention
