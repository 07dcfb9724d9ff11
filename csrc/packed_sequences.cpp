#include "packed_sequences.h"

#include <ATen/ATen.h>

namespace sparse_attention {

namespace {

std::vector<int64_t> read_starts(const char* name, const at::Tensor& cu, int64_t total) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, name,
                    ": expected int32 or int64, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 2, name,
                    ": expected a 1-d tensor [documents + 1] (starts and the total), got shape ",
                    cu.sizes());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), name, ": expected a CPU tensor, got ", cu.device());
  const at::Tensor values = cu.to(at::kLong).contiguous();
  const int64_t* v = values.data_ptr<int64_t>();
  std::vector<int64_t> starts(v, v + values.numel());
  TORCH_CHECK_VALUE(starts.front() == 0, name, ": must start at 0, got ", starts.front());
  for (size_t d = 1; d < starts.size(); ++d) {
    TORCH_CHECK_VALUE(starts[d] >= starts[d - 1], name, ": must be non-decreasing, but entry ", d,
                      " (", starts[d], ") is below entry ", d - 1, " (", starts[d - 1], ")");
  }
  TORCH_CHECK_VALUE(starts.back() == total, name, ": must end at the sequence length of the ",
                    "tensors (", total, "), got ", starts.back());
  return starts;
}

std::vector<int64_t> block_starts(const std::vector<int64_t>& starts, int64_t block_size) {
  std::vector<int64_t> blocks(starts.size(), 0);
  for (size_t d = 1; d < starts.size(); ++d) {
    const int64_t len = starts[d] - starts[d - 1];
    blocks[d] = blocks[d - 1] + (len + block_size - 1) / block_size;
  }
  return blocks;
}

}  // namespace

void attach_packed_sequences(Problem* p, const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, bool has_key_padding,
                             PackedSequences* storage) {
  if (!cu_seqlens_q && !cu_seqlens_k) return;
  TORCH_CHECK_VALUE(cu_seqlens_q && cu_seqlens_k,
                    "cu_seqlens_q, cu_seqlens_k: expected both or neither");
  TORCH_CHECK_VALUE(p->batch == 1, "q: packed documents (cu_seqlens) take one batch entry "
                    "[1, heads, total tokens, head_dim], got batch ", p->batch);
  TORCH_CHECK_VALUE(!has_key_padding, "key_padding_mask: not taken with cu_seqlens (each ",
                    "document ends where its keys do)");
  storage->q_starts = read_starts("cu_seqlens_q", *cu_seqlens_q, p->q_len);
  storage->k_starts = read_starts("cu_seqlens_k", *cu_seqlens_k, p->k_len);
  TORCH_CHECK_VALUE(storage->q_starts.size() == storage->k_starts.size(),
                    "cu_seqlens_k: expected as many documents as cu_seqlens_q (",
                    storage->q_starts.size() - 1, "), got ", storage->k_starts.size() - 1);
  storage->q_block_starts = block_starts(storage->q_starts, p->block_size);
  storage->k_block_starts = block_starts(storage->k_starts, p->block_size);
  p->documents = static_cast<int64_t>(storage->q_starts.size()) - 1;
  p->q_starts = storage->q_starts.data();
  p->k_starts = storage->k_starts.data();
  p->q_block_starts = storage->q_block_starts.data();
  p->k_block_starts = storage->k_block_starts.data();
}

}  // namespace sparse_attention
