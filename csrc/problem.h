// The size and rules of one attention call, as every device's host code and kernels read
// them. Plain data: no torch objects, so kernels (CPU and CUDA) can take it by value.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "block_rules.h"

namespace sparse_attention {

struct Problem {
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t q_len = 0, k_len = 0, head_dim = 0;
  int64_t block_size = 0, q_blocks = 0, k_blocks = 0;
  bool per_head_layout = false;  // layout lists per query head, or one shared by all heads
  double scale = 1.0;
  Window window;
  const uint8_t* key_padding = nullptr;      // [batch, k_len], 1 = ignore; null = none
  const uint8_t* key_block_state = nullptr;  // [batch, k_blocks] KeyBlockState; null = none

  int64_t group() const { return heads / kv_heads; }
  int64_t layout_head(int64_t head) const { return per_head_layout ? head : 0; }
};

}  // namespace sparse_attention
