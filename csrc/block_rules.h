// Element rules of the op and how they classify a (query block, key block) pair.
// Header-only and free of torch types so CPU and CUDA kernels, the layout planner and the
// C++ tests all share one definition.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE inline
#endif

namespace sparse_attention {

// A band around the bottom-right aligned diagonal: query i sees key j when
//   i + offset - left <= j <= i + offset + right,   offset = k_len - q_len,
// with a negative bound meaning "unbounded". causal is {left: -1, right: 0}.
struct Window {
  int64_t left = -1;
  int64_t right = -1;
  int64_t offset = 0;

  SA_HOST_DEVICE bool visible(int64_t i, int64_t j) const {
    const int64_t d = j - i - offset;
    return (left < 0 || d >= -left) && (right < 0 || d <= right);
  }
};

enum class BlockKind : uint8_t {
  kSkip = 0,     // no element of the block is visible: never computed
  kFull = 1,     // every element is visible: computed without an element mask
  kPartial = 2,  // some elements are visible: computed with the element mask
};

// Classifies block (qb, kb). Tail blocks (past q_len or k_len) count as partial so kernels
// that rely on the mask for bounds stay correct.
SA_HOST_DEVICE BlockKind classify_block(int64_t qb, int64_t kb, int64_t q_len, int64_t k_len,
                                        int64_t block_size, const Window& w) {
  const int64_t q0 = qb * block_size, q1 = std::min(q0 + block_size, q_len) - 1;
  const int64_t k0 = kb * block_size, k1 = std::min(k0 + block_size, k_len) - 1;
  // Smallest and largest key-minus-query distance inside the block.
  const int64_t d_min = k0 - q1 - w.offset, d_max = k1 - q0 - w.offset;
  if ((w.right >= 0 && d_min > w.right) || (w.left >= 0 && d_max < -w.left)) {
    return BlockKind::kSkip;
  }
  const bool band_covers = (w.right < 0 || d_max <= w.right) && (w.left < 0 || d_min >= -w.left);
  const bool whole = (q1 - q0 + 1 == block_size) && (k1 - k0 + 1 == block_size);
  return band_covers && whole ? BlockKind::kFull : BlockKind::kPartial;
}

// Index of the block list of (batch entry, query head, block) among lists laid out over
// (list batch, layout head, block): list_batch is 1 (one layout for the batch) or the batch,
// layout_heads is 1 (shared by all heads), the kv heads (one per GQA group) or the query
// heads; `blocks` is the number of query blocks (row lists) or key blocks (column lists).
SA_HOST_DEVICE int64_t list_index(int64_t list_batch, int64_t layout_heads, int64_t heads,
                                  int64_t batch, int64_t head, int64_t block, int64_t blocks) {
  const int64_t b = list_batch > 1 ? batch : 0;
  return (b * layout_heads + head / (heads / layout_heads)) * blocks + block;
}

// One sequence of a call: a batch entry, or one document of a packed row. Lengths and block
// indices are the sequence's own; *_begin place its first token in the tensors.
struct Sequence {
  int64_t batch = 0;  // the tensors' batch entry
  int64_t q_begin = 0, k_begin = 0;
  int64_t q_len = 0, k_len = 0;
  Window window;  // the call's bounds, aligned bottom-right within the sequence

  SA_HOST_DEVICE int64_t q_blocks(int64_t block_size) const {
    return (q_len + block_size - 1) / block_size;
  }
  SA_HOST_DEVICE int64_t k_blocks(int64_t block_size) const {
    return (k_len + block_size - 1) / block_size;
  }
};

// Sequence s of a call over tensors of q_len and k_len tokens with bounds `window`: batch
// entry s, or with packed document starts (q_starts, k_starts: [documents + 1]) document s
// of batch entry 0.
SA_HOST_DEVICE Sequence sequence_at(int64_t s, const int64_t* q_starts, const int64_t* k_starts,
                                    int64_t q_len, int64_t k_len, const Window& window) {
  Sequence seq;
  seq.window = window;
  if (q_starts == nullptr) {
    seq.batch = s;
    seq.q_len = q_len;
    seq.k_len = k_len;
    return seq;
  }
  seq.q_begin = q_starts[s];
  seq.k_begin = k_starts[s];
  seq.q_len = q_starts[s + 1] - seq.q_begin;
  seq.k_len = k_starts[s + 1] - seq.k_begin;
  seq.window.offset = seq.k_len - seq.q_len;
  return seq;
}

// Per (batch, key block) summary of a key padding mask.
enum class KeyBlockState : uint8_t {
  kAllValid = 0,
  kMixed = 1,
  kAllPadded = 2,
};

}  // namespace sparse_attention
