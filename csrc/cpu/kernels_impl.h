// Body of one kernels_<capability>.cpp: dtype dispatch into the kernel templates. The
// including file defines CPU_CAPABILITY (the namespace) before including this.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "backward_kernel.h"
#include "block_mass_kernel.h"
#include "forward_kernel.h"
#include "kernels.h"

namespace sparse_attention::cpu::capability::CPU_CAPABILITY {

namespace {
template <typename Fn>
void dispatch_dtype(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: fn(float{}); break;
    case c10::ScalarType::Double: fn(double{}); break;
    case c10::ScalarType::Half: fn(c10::Half{}); break;
    case c10::ScalarType::BFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "sparse_attention: unsupported dtype ", dtype);
  }
}
}  // namespace

void forward(const ForwardParams& params) {
  dispatch_dtype(params.problem.dtype, [&](auto tag) {
    forward_kernel<decltype(tag)>(params);
  });
}

void backward(const BackwardParams& params) {
  dispatch_dtype(params.problem.dtype, [&](auto tag) {
    backward_kernel<decltype(tag)>(params);
  });
}

void block_mass(const BlockMassParams& params) {
  dispatch_dtype(params.problem.dtype, [&](auto tag) {
    block_mass_kernel<decltype(tag)>(params);
  });
}

bool available() { return true; }

}  // namespace sparse_attention::cpu::capability::CPU_CAPABILITY
