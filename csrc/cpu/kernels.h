// Entry points of the CPU kernels, compiled once per instruction set (kernels_default.cpp,
// kernels_x86_avx2.cpp, kernels_x86_avx512.cpp). forward()/backward() pick the best one the
// processor supports, as ATen does (ATEN_CPU_CAPABILITY is honoured).
#pragma once

#include "params.h"

namespace sparse_attention::cpu {

// Entry points live in capability::<ISA>; the kernel templates themselves live in the
// inline namespace sparse_attention::cpu::<ISA> of their own translation unit.
#define SA_DECLARE_KERNELS(CAPABILITY)             \
  namespace capability::CAPABILITY {               \
  void forward(const ForwardParams& params);       \
  void backward(const BackwardParams& params);     \
  void block_mass(const BlockMassParams& params);  \
  bool available();                                \
  }

// The entry points of an instruction set the compiler cannot target: never picked, since
// available() is false.
#define SA_DEFINE_UNAVAILABLE_KERNELS(CAPABILITY)                                         \
  namespace sparse_attention::cpu::capability::CAPABILITY {                               \
  void forward(const ForwardParams&) { TORCH_CHECK(false, #CAPABILITY " kernels not built"); } \
  void backward(const BackwardParams&) { TORCH_CHECK(false, #CAPABILITY " kernels not built"); } \
  void block_mass(const BlockMassParams&) { TORCH_CHECK(false, #CAPABILITY " kernels not built"); } \
  bool available() { return false; }                                                      \
  }

SA_DECLARE_KERNELS(DEFAULT)
SA_DECLARE_KERNELS(AVX2)
SA_DECLARE_KERNELS(AVX512)
#undef SA_DECLARE_KERNELS

void forward(const ForwardParams& params);
void backward(const BackwardParams& params);
void block_mass(const BlockMassParams& params);

// The instruction set the kernels run with: "AVX512", "AVX2" or "DEFAULT".
const char* kernel_capability();

}  // namespace sparse_attention::cpu
