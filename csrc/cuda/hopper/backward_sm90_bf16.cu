// The Hopper backward's bf16 instantiations (head dims 64 and 128).
#include "launch_sm90.cuh"

namespace sparse_attention::cuda::hopper {
template void run_backward_sm90<DType::kBFloat16, 64>(const Params&, void*);
template void run_backward_sm90<DType::kBFloat16, 128>(const Params&, void*);
}  // namespace sparse_attention::cuda::hopper
