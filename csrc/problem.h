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
  int64_t q_len = 0, k_len = 0, head_dim = 0;  // of the tensors
  // Blocks along the lists' grid: those of q_len and k_len, or for packed documents the
  // lists' padded per-document width (at least every document's blocks).
  int64_t block_size = 0, q_blocks = 0, k_blocks = 0;
  // Shape of the block lists: [list_batch, layout_heads, blocks] (see list_index).
  int64_t list_batch = 1, layout_heads = 1;
  double scale = 1.0;
  Window window;
  const uint8_t* key_padding = nullptr;      // [batch, k_len], 1 = ignore; null = none
  const uint8_t* key_block_state = nullptr;  // [batch, k_blocks] KeyBlockState; null = none

  // Packed documents (varlen): the tensors hold one batch entry and document s covers tokens
  // [q_starts[s], q_starts[s + 1]) of q and [k_starts[s], k_starts[s + 1]) of k, with its own
  // block grid and lists (list batch = documents). *_block_starts[s] number the documents'
  // blocks one after another, for tasks. All null: the sequences are the batch entries.
  int64_t documents = 0;
  const int64_t* q_starts = nullptr;
  const int64_t* k_starts = nullptr;
  const int64_t* q_block_starts = nullptr;
  const int64_t* k_block_starts = nullptr;

  bool packed() const { return q_starts != nullptr; }
  int64_t sequences() const { return packed() ? documents : batch; }
  int64_t group() const { return heads / kv_heads; }
  int64_t num_lists() const { return list_batch * layout_heads; }  // per block of the grid
  int64_t list(int64_t s, int64_t head, int64_t block, int64_t blocks) const {
    return list_index(list_batch, layout_heads, heads, s, head, block, blocks);
  }

  Sequence sequence(int64_t s) const {
    return sequence_at(s, q_starts, k_starts, q_len, k_len, window);
  }

  // Query blocks (or key blocks) of all sequences together: what tasks are numbered over.
  int64_t total_q_blocks() const { return packed() ? q_block_starts[documents] : batch * q_blocks; }
  int64_t total_k_blocks() const { return packed() ? k_block_starts[documents] : batch * k_blocks; }

  // (sequence, block) of block `g` among total_q_blocks (rows) or total_k_blocks (columns).
  void locate(int64_t g, bool rows, int64_t* s, int64_t* block) const {
    if (!packed()) {
      const int64_t blocks = rows ? q_blocks : k_blocks;
      *s = g / blocks;
      *block = g % blocks;
      return;
    }
    const int64_t* starts = rows ? q_block_starts : k_block_starts;
    // starts[lo] <= g < starts[hi] throughout, so the document found is never empty.
    int64_t lo = 0, hi = documents;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (starts[mid] <= g ? lo : hi) = mid;
    }
    *s = lo;
    *block = g - starts[lo];
  }

  // Row `i` of sequence `seq` in a [batch, heads, q_len] array (lse, delta, flattened out).
  int64_t q_row(const Sequence& seq, int64_t head, int64_t i) const {
    return (seq.batch * heads + head) * q_len + seq.q_begin + i;
  }
  // Row `j` of sequence `seq` in a [batch, kv_heads, k_len] array (flattened dK, dV).
  int64_t k_row(const Sequence& seq, int64_t kv_head, int64_t j) const {
    return (seq.batch * kv_heads + kv_head) * k_len + seq.k_begin + j;
  }
};

}  // namespace sparse_attention
