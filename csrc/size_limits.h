// Size limits of the ops: every index the kernels and block lists compute must fit its integer
// type. Checked by the host code before anything is allocated.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace sparse_attention {

// Largest block size: each thread's scratch holds block_size^2 scores (an unchecked size
// could overflow that count), and sparse_attention.layout.MAX_BLOCK_SIZE is the same.
constexpr int64_t kMaxBlockSize = 256;

// Block lists store block indices and offsets as int32.
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

// Raises ValueError unless block_size is in [1, kMaxBlockSize] and both sequence lengths
// split into at most kMaxBlocks blocks. No product here can overflow int64.
inline void check_size_limits(int64_t q_len, int64_t k_len, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= kMaxBlockSize,
                    "block_size: expected an integer from 1 to ", kMaxBlockSize, ", got ", block_size);
  const int64_t max_len = kMaxBlocks * block_size;
  TORCH_CHECK_VALUE(q_len <= max_len, "q: sequence length ", q_len, " needs more than ", kMaxBlocks,
                    " blocks of ", block_size, " (block lists index blocks with int32)");
  TORCH_CHECK_VALUE(k_len <= max_len, "k: sequence length ", k_len, " needs more than ", kMaxBlocks,
                    " blocks of ", block_size, " (block lists index blocks with int32)");
}

}  // namespace sparse_attention
