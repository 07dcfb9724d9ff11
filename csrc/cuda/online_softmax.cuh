// The online softmax's per-row bookkeeping in base 2, shared by the mma.sync forward and the
// Hopper forward (the score layouts differ, the arithmetic must not).
#pragma once

#include <cmath>

namespace sparse_attention::cuda {

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

struct SoftmaxStep {
  float shift;       // scores become exp2(s - shift)
  float correction;  // what the row's running sum and output are multiplied by
};

// Folds a tile's row maximum (already reduced over the row's lanes) into the running one. A
// row that has seen no key yet shifts by 0, so exp2(-inf) = 0 everywhere instead of NaN.
__device__ __forceinline__ SoftmaxStep online_softmax_step(float& row_max, float& row_sum, float tile_max) {
  const float m = fmaxf(row_max, tile_max);
  const float shift = m == -INFINITY ? 0.f : m;
  const float correction = exp2f(row_max - shift);
  row_max = m;
  row_sum *= correction;
  return {shift, correction};
}

// The natural-log lse of a finished row; a row that saw no key returns 0 with lse = -inf.
__device__ __forceinline__ float row_lse(float row_max, float sum) {
  return sum > 0.f ? row_max * kLn2 + logf(sum) : -INFINITY;
}

}  // namespace sparse_attention::cuda
