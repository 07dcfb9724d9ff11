// A [B, H, N, D] attention operand as the kernels of every device read it: plain data, no
// torch or CUDA types.
#pragma once

#include <cstdint>

namespace sparse_attention {

// Unit stride along D; strides in elements. (The CUDA kernels also need rows 16-byte aligned,
// for cp.async; their host code checks it.)
struct Operand {
  const void* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
};

}  // namespace sparse_attention
