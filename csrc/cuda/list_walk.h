// Walking the block lists: which (query tile, key tile) pairs a thread block computes,
// whether each needs the element mask, and the mask itself. Host and device code: the Hopper
// kernel's producer and consumers walk with the same BlockWalk, and the CPU tests run it on
// random lists (tests/test_hopper_pipeline.py). Every thread of a block walks the same lists,
// so all control flow here is uniform across the block.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../block_rules.h"
#include "params.h"

namespace sparse_attention::cuda {

// Sequence s (grid z) of the call: a batch entry or a packed document.
SA_HOST_DEVICE Sequence sequence_of(const Params& p, int s) {
  return sequence_at(s, p.q_starts, p.k_starts, p.q_len, p.k_len, p.window);
}

// Row `row` of a sequence's head `head` in a [batch, heads, rows] array of the tensors'
// rows (lse, delta, out and gradients flattened per row).
SA_HOST_DEVICE int64_t flat_row(const Sequence& seq, int heads, int head, int64_t rows,
                                            int64_t begin, int row) {
  return (seq.batch * heads + head) * rows + begin + row;
}

SA_HOST_DEVICE KeyBlockState key_block_state(const Params& p, int batch, int kb) {
  return p.key_block_state ? static_cast<KeyBlockState>(p.key_block_state[batch * p.k_blocks + kb])
                           : KeyBlockState::kAllValid;
}

// Whether pair (qb, kb) must apply the element rules: a partial block under the layout rules
// (recomputed here rather than trusted from the lists' full counts), or mixed key padding.
SA_HOST_DEVICE bool block_needs_mask(const Params& p, const Sequence& seq, int qb, int kb) {
  return classify_block(qb, kb, seq.q_len, seq.k_len, p.block_size, seq.window) != BlockKind::kFull ||
         key_block_state(p, seq.batch, kb) == KeyBlockState::kMixed;
}

// Whether key `key` is visible to query `query` (positions within the sequence).
SA_HOST_DEVICE bool element_visible(const Params& p, const Sequence& seq, int query, int key) {
  return key < seq.k_len && seq.window.visible(query, key) &&
         !(p.key_padding && p.key_padding[seq.batch * p.k_len + seq.k_begin + key]);
}

// Entry range [begin, end) of list `list`, clamped to the index array.
SA_HOST_DEVICE void list_range(const DeviceLists& l, int list, int* begin, int* end) {
  *begin = std::min(std::max(l.offsets[list], 0), l.nnz);
  *end = std::min(std::max(l.offsets[list + 1], *begin), l.nnz);
}

// One step of a walk: tile `sub` of the block named by entry `entry`.
struct Step {
  int group_head = 0;  // column walks: which query head of the kv head's group
  int entry = 0, end = 0, sub = 0;
  int block = 0;       // the listed block: a key block (row walks) or query block (column walks)
};

// Walks a row list (the key tiles of query block `fixed`, kRows) or the column lists of
// every query head sharing a kv head (the query tiles of key block `fixed`) of sequence `s`,
// skipping entries outside the grid, tiles past the sequence end and key blocks padding hides.
template <bool kRows, int kSubTiles, int kTile>
struct BlockWalk {
  const Params& p;
  const Sequence& seq;
  int s, head, fixed, group;
  Step step;
  bool done = false;

  SA_HOST_DEVICE BlockWalk(const Params& params, const Sequence& seq_, int s_, int head_, int fixed_)
      : p(params), seq(seq_), s(s_), head(head_), fixed(fixed_),
        group(kRows ? 1 : params.heads / params.kv_heads) {
    start_list(0);
    settle();
  }

  // The query head of this step (column walks go through the kv head's group).
  SA_HOST_DEVICE int query_head() const { return kRows ? head : head * group + step.group_head; }

  // First row (query or key) of the step's tile.
  SA_HOST_DEVICE int tile_start() const { return step.block * p.block_size + step.sub * kTile; }

  SA_HOST_DEVICE void next() {
    advance();
    settle();
  }

 private:
  SA_HOST_DEVICE void start_list(int group_head) {
    step.group_head = group_head;
    step.sub = 0;
    if (group_head >= group) {
      done = true;
      return;
    }
    const int list = static_cast<int>(list_index(p.list_batch, p.layout_heads, p.heads, s,
                                                 kRows ? head : head * group + group_head, fixed,
                                                 kRows ? p.q_blocks : p.k_blocks));
    list_range(kRows ? p.rows : p.cols, list, &step.entry, &step.end);
  }

  SA_HOST_DEVICE void advance() {
    if (++step.sub == kSubTiles) {
      step.sub = 0;
      ++step.entry;
    }
  }

  SA_HOST_DEVICE bool valid() {
    const int block = (kRows ? p.rows : p.cols).indices[step.entry];
    const int across = kRows ? p.k_blocks : p.q_blocks;
    if (block < 0 || block >= across) return false;
    step.block = block;
    if (tile_start() >= (kRows ? seq.k_len : seq.q_len)) return false;
    return !kRows || key_block_state(p, seq.batch, block) != KeyBlockState::kAllPadded;
  }

  // Moves to the first valid step at or after the current one.
  SA_HOST_DEVICE void settle() {
    while (!done) {
      if (step.entry >= step.end) {
        start_list(step.group_head + 1);
      } else if (valid()) {
        return;
      } else {
        advance();
      }
    }
  }
};

}  // namespace sparse_attention::cuda
