// Conversion of a dense block mask into the per-row and per-column block lists the kernels
// walk, and the checks that make lists handed to an op safe to walk.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "block_rules.h"
#include "problem.h"

namespace sparse_attention {

// (row_offsets, row_indices, row_num_full, col_offsets, col_indices, col_num_full), all int32.
using BlockListTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// block_mask: bool [layout_heads, q_blocks, k_blocks]. Blocks that the window hides entirely
// are dropped; each list holds its full blocks first; the full counts have the shape
// [1, layout_heads, blocks] the ops read the lists' batch and heads from. Costs O(blocks).
BlockListTensors build_block_lists(const at::Tensor& block_mask, int64_t q_len, int64_t k_len,
                                   int64_t block_size, int64_t window_left, int64_t window_right);

// BlockKind of every (query block, key block) pair, uint8 [q_blocks, k_blocks] on the CPU.
at::Tensor block_kinds(int64_t q_len, int64_t k_len, int64_t block_size, int64_t window_left,
                       int64_t window_right);

// Checks one CSR list set of problem `p` (its list shape set, see set_list_shape): offsets
// monotone from 0 to at most the number of indices (entries past the last offset are unused
// capacity), indices within their sequence's blocks, no repeats, lists past a packed
// document's blocks empty, and every entry listed as full is full under the element rules of
// its sequence (so the kernel may skip its mask). `rows` says whether the lists are per query
// block (indices are key blocks) or per key block.
void check_block_lists(const char* name, const at::Tensor& offsets, const at::Tensor& indices,
                       const at::Tensor& num_full, const Problem& p, bool rows);

}  // namespace sparse_attention
