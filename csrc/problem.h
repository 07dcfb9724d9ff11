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
  // Shape of the block lists: [list_batch, layout_heads, blocks] (see list_index).
  int64_t list_batch = 1, layout_heads = 1;
  double scale = 1.0;
  Window window;
  const uint8_t* key_padding = nullptr;      // [batch, k_len], 1 = ignore; null = none
  const uint8_t* key_block_state = nullptr;  // [batch, k_blocks] KeyBlockState; null = none

  int64_t group() const { return heads / kv_heads; }
  int64_t num_lists() const { return list_batch * layout_heads; }  // per block of the grid
  int64_t list(int64_t b, int64_t head, int64_t block, int64_t blocks) const {
    return list_index(list_batch, layout_heads, heads, b, head, block, blocks);
  }
};

}  // namespace sparse_attention
