// Packed documents (varlen calls): the checks of cu_seqlens_q / cu_seqlens_k and the
// document tables a Problem points at.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "problem.h"

namespace sparse_attention {

// Owns the tables of a packed call; the Problem points into it, so it must outlive the call.
struct PackedSequences {
  std::vector<int64_t> q_starts, k_starts, q_block_starts, k_block_starts;
};

// Neither given: the call is not packed and nothing changes. Otherwise checks both (1-d int32
// or int64 CPU tensors of the same length >= 2, starting at 0, non-decreasing, ending at the
// tensors' lengths), that the tensors hold one batch entry and that no key padding mask is
// given (documents end where their keys do), fills `storage` and points `p` at it.
void attach_packed_sequences(Problem* p, const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, bool has_key_padding,
                             PackedSequences* storage);

}  // namespace sparse_attention
