#include <ATen/Version.h>

#include <string>

#include "kernels.h"

namespace sparse_attention::cpu {

namespace {
enum class Capability { kDefault, kAvx2, kAvx512 };

// ATen's choice (the processor, lowered by ATEN_CPU_CAPABILITY), limited to what was built.
Capability pick() {
  const std::string aten = at::get_cpu_capability();
  if (aten == "AVX512" && capability::AVX512::available()) return Capability::kAvx512;
  if ((aten == "AVX512" || aten == "AVX2") && capability::AVX2::available()) return Capability::kAvx2;
  return Capability::kDefault;
}

Capability chosen_capability() {
  static const Capability chosen = pick();
  return chosen;
}
}  // namespace

void forward(const ForwardParams& params) {
  switch (chosen_capability()) {
    case Capability::kAvx512: return capability::AVX512::forward(params);
    case Capability::kAvx2: return capability::AVX2::forward(params);
    default: return capability::DEFAULT::forward(params);
  }
}

void backward(const BackwardParams& params) {
  switch (chosen_capability()) {
    case Capability::kAvx512: return capability::AVX512::backward(params);
    case Capability::kAvx2: return capability::AVX2::backward(params);
    default: return capability::DEFAULT::backward(params);
  }
}

void block_mass(const BlockMassParams& params) {
  switch (chosen_capability()) {
    case Capability::kAvx512: return capability::AVX512::block_mass(params);
    case Capability::kAvx2: return capability::AVX2::block_mass(params);
    default: return capability::DEFAULT::block_mass(params);
  }
}

const char* kernel_capability() {
  switch (chosen_capability()) {
    case Capability::kAvx512: return "AVX512";
    case Capability::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace sparse_attention::cpu
