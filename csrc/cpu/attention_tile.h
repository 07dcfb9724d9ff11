// Per-block steps shared by the forward and backward kernels: scores of one
// (query block, key block) pair with the element rules applied, and probabilities
// recomputed from the saved log-sum-exp.
#pragma once

#include <cmath>
#include <limits>

#include "params.h"
#include "tile_ops.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

// Rows and columns of one block pair, clipped to the sequence ends.
struct BlockPair {
  int64_t q0, qn, k0, kn;
  bool masked;  // element rules must be applied (partial block or mixed padding)
};

template <typename T>
inline void apply_element_mask(const Problem& p, int64_t batch, const BlockPair& blk, T* s,
                               int64_t ld) {
  const uint8_t* pad = p.key_padding ? p.key_padding + batch * p.k_len + blk.k0 : nullptr;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < blk.qn; ++i) {
    for (int64_t j = 0; j < blk.kn; ++j) {
      if (!p.window.visible(blk.q0 + i, blk.k0 + j) || (pad && pad[j])) s[i * ld + j] = kNegInf;
    }
  }
}

// s[qn x kn] = q_scaled[qn x D] * k_t[D x kn], masked where the element rules say so.
template <typename T>
inline void block_scores(const Problem& p, int64_t batch, const BlockPair& blk, const T* q_scaled,
                         const T* k_t, T* s) {
  gemm_nn<false>(blk.qn, blk.kn, p.head_dim, q_scaled, p.head_dim, k_t, blk.kn, s, blk.kn);
  if (blk.masked) apply_element_mask(p, batch, blk, s, blk.kn);
}

// s <- exp(s - lse) row by row: the softmax probabilities of the forward pass. Rows that
// saw no key (lse = -inf) get 0.
template <typename T>
inline void probabilities_from_lse(const BlockPair& blk, const T* lse, T* s) {
  for (int64_t i = 0; i < blk.qn; ++i) {
    T* row = s + i * blk.kn;
    if (std::isinf(lse[i])) {
      std::fill(row, row + blk.kn, T(0));
    } else {
      exp_shift_sum(row, blk.kn, lse[i]);
    }
  }
}

// Key-block state of a batch entry under key padding (all valid when there is none).
inline KeyBlockState key_block_state(const Problem& p, int64_t batch, int64_t kb) {
  return p.key_block_state
             ? static_cast<KeyBlockState>(p.key_block_state[batch * p.k_blocks + kb])
             : KeyBlockState::kAllValid;
}

// Describes entry `e` of a block list, or returns false when padding hides the whole block.
inline bool make_block_pair(const Problem& p, int64_t batch, int64_t qb, int64_t kb,
                            bool listed_partial, BlockPair* blk) {
  const KeyBlockState state = key_block_state(p, batch, kb);
  if (state == KeyBlockState::kAllPadded) return false;
  blk->q0 = qb * p.block_size;
  blk->qn = std::min(p.block_size, p.q_len - blk->q0);
  blk->k0 = kb * p.block_size;
  blk->kn = std::min(p.block_size, p.k_len - blk->k0);
  blk->masked = listed_partial || state == KeyBlockState::kMixed;
  return true;
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
