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
// Whether bfloat16 tiles are multiplied natively: the build has the pair products and the
// processor the instruction.
bool pair_products() {
#if SA_PAIR_PRODUCTS
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

// Calls fn(scalar, pairs) with a value of the dtype and std::bool_constant<kPairs>.
template <typename Fn>
void dispatch(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: fn(float{}, std::false_type{}); break;
    case c10::ScalarType::Double: fn(double{}, std::false_type{}); break;
    case c10::ScalarType::Half: fn(c10::Half{}, std::false_type{}); break;
    case c10::ScalarType::BFloat16:
      if (SA_PAIR_PRODUCTS && pair_products()) {
        fn(c10::BFloat16{}, std::true_type{});
      } else {
        fn(c10::BFloat16{}, std::false_type{});
      }
      break;
    default: TORCH_CHECK(false, "sparse_attention: unsupported dtype ", dtype);
  }
}
}  // namespace

void forward(const ForwardParams& params) {
  dispatch(params.problem.dtype, [&](auto tag, auto pairs) {
    forward_kernel<decltype(tag), decltype(pairs)::value>(params);
  });
}

void backward(const BackwardParams& params) {
  dispatch(params.problem.dtype, [&](auto tag, auto pairs) {
    backward_kernel<decltype(tag), decltype(pairs)::value>(params);
  });
}

void block_mass(const BlockMassParams& params) {
  dispatch(params.problem.dtype, [&](auto tag, auto pairs) {
    block_mass_kernel<decltype(tag), decltype(pairs)::value>(params);
  });
}

bool available() { return true; }

}  // namespace sparse_attention::cpu::capability::CPU_CAPABILITY
