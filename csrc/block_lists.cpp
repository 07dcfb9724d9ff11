#include "block_lists.h"
#include "size_limits.h"

#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace sparse_attention {

namespace {
Window make_window(int64_t q_len, int64_t k_len, int64_t left, int64_t right) {
  Window w;
  w.left = left;
  w.right = right;
  w.offset = k_len - q_len;
  return w;
}

at::Tensor to_tensor(const std::vector<int32_t>& values) {
  auto t = at::empty({static_cast<int64_t>(values.size())}, at::kInt);
  std::copy(values.begin(), values.end(), t.data_ptr<int32_t>());
  return t;
}
}  // namespace

BlockListTensors build_block_lists(const at::Tensor& block_mask, int64_t q_len, int64_t k_len,
                                   int64_t block_size, int64_t window_left,
                                   int64_t window_right) {
  TORCH_CHECK_VALUE(block_mask.dim() == 3 && block_mask.scalar_type() == at::kBool &&
                        block_mask.device().is_cpu(),
                    "block_mask: expected a bool CPU tensor [heads, q_blocks, k_blocks], got ",
                    block_mask.scalar_type(), " ", block_mask.sizes(), " on ", block_mask.device());
  TORCH_CHECK_VALUE(block_size > 0 && q_len > 0 && k_len > 0,
                    "block_size, q_len and k_len must be positive");
  check_size_limits(q_len, k_len, block_size);
  const int64_t heads = block_mask.size(0), q_blocks = block_mask.size(1),
                k_blocks = block_mask.size(2);
  TORCH_CHECK_VALUE(q_blocks == (q_len + block_size - 1) / block_size &&
                        k_blocks == (k_len + block_size - 1) / block_size,
                    "block_mask: a grid of ", q_blocks, " x ", k_blocks, " blocks does not fit q_len ",
                    q_len, " and k_len ", k_len, " with block_size ", block_size);
  TORCH_CHECK_VALUE(heads * q_blocks * k_blocks < std::numeric_limits<int32_t>::max(),
                    "block_mask: too many blocks for 32-bit block lists");
  const Window window = make_window(q_len, k_len, window_left, window_right);
  const at::Tensor mask = block_mask.contiguous();
  const bool* m = mask.data_ptr<bool>();

  // Kind of every block once; then rows and columns are filled full-first in two sweeps.
  std::vector<uint8_t> kind(heads * q_blocks * k_blocks);
  std::vector<int32_t> row_count(heads * q_blocks, 0), row_full(heads * q_blocks, 0);
  std::vector<int32_t> col_count(heads * k_blocks, 0), col_full(heads * k_blocks, 0);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t qb = 0; qb < q_blocks; ++qb) {
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int64_t at_ = (h * q_blocks + qb) * k_blocks + kb;
        const BlockKind k = m[at_] ? classify_block(qb, kb, q_len, k_len, block_size, window)
                                   : BlockKind::kSkip;
        kind[at_] = static_cast<uint8_t>(k);
        if (k == BlockKind::kSkip) continue;
        ++row_count[h * q_blocks + qb];
        ++col_count[h * k_blocks + kb];
        if (k == BlockKind::kFull) {
          ++row_full[h * q_blocks + qb];
          ++col_full[h * k_blocks + kb];
        }
      }
    }
  }
  auto exclusive_scan = [](const std::vector<int32_t>& counts) {
    std::vector<int32_t> offsets(counts.size() + 1, 0);
    for (size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
    return offsets;
  };
  const std::vector<int32_t> row_offsets = exclusive_scan(row_count);
  const std::vector<int32_t> col_offsets = exclusive_scan(col_count);
  std::vector<int32_t> row_indices(row_offsets.back()), col_indices(col_offsets.back());
  // Next free slot of each list's full and partial sections.
  std::vector<int32_t> row_next_full(row_offsets.begin(), row_offsets.end() - 1);
  std::vector<int32_t> row_next_partial(row_count.size()), col_next_full(col_offsets.begin(), col_offsets.end() - 1),
      col_next_partial(col_count.size());
  for (size_t r = 0; r < row_count.size(); ++r) row_next_partial[r] = row_offsets[r] + row_full[r];
  for (size_t c = 0; c < col_count.size(); ++c) col_next_partial[c] = col_offsets[c] + col_full[c];
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t qb = 0; qb < q_blocks; ++qb) {
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const auto k = static_cast<BlockKind>(kind[(h * q_blocks + qb) * k_blocks + kb]);
        if (k == BlockKind::kSkip) continue;
        const int64_t r = h * q_blocks + qb, c = h * k_blocks + kb;
        const bool full = k == BlockKind::kFull;
        row_indices[full ? row_next_full[r]++ : row_next_partial[r]++] = static_cast<int32_t>(kb);
        col_indices[full ? col_next_full[c]++ : col_next_partial[c]++] = static_cast<int32_t>(qb);
      }
    }
  }
  return {to_tensor(row_offsets), to_tensor(row_indices), to_tensor(row_full).view({1, heads, q_blocks}),
          to_tensor(col_offsets), to_tensor(col_indices), to_tensor(col_full).view({1, heads, k_blocks})};
}

at::Tensor block_kinds(int64_t q_len, int64_t k_len, int64_t block_size, int64_t window_left,
                       int64_t window_right) {
  TORCH_CHECK_VALUE(block_size > 0 && q_len > 0 && k_len > 0,
                    "block_size, q_len and k_len must be positive");
  check_size_limits(q_len, k_len, block_size);
  const int64_t q_blocks = (q_len + block_size - 1) / block_size;
  const int64_t k_blocks = (k_len + block_size - 1) / block_size;
  TORCH_CHECK_VALUE(q_blocks * k_blocks < std::numeric_limits<int32_t>::max(),
                    "q_len, k_len: too many blocks for 32-bit block lists");
  const Window window = make_window(q_len, k_len, window_left, window_right);
  at::Tensor kinds = at::empty({q_blocks, k_blocks}, at::kByte);
  uint8_t* out = kinds.data_ptr<uint8_t>();
  for (int64_t qb = 0; qb < q_blocks; ++qb) {
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      out[qb * k_blocks + kb] =
          static_cast<uint8_t>(classify_block(qb, kb, q_len, k_len, block_size, window));
    }
  }
  return kinds;
}

void check_block_lists(const char* name, const at::Tensor& offsets, const at::Tensor& indices,
                       const at::Tensor& num_full, const Problem& p, bool rows) {
  const int64_t blocks_along = rows ? p.q_blocks : p.k_blocks;
  const int64_t blocks_across = rows ? p.k_blocks : p.q_blocks;
  const int64_t num_lists = p.num_lists() * blocks_along;
  for (const auto* t : {&offsets, &indices, &num_full}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && (t->dim() == 1 || t == &num_full) &&
                          t->is_contiguous() && t->device().is_cpu(),
                      name, " block lists: expected contiguous int32 CPU tensors (offsets and ",
                      "indices 1-d), got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK_VALUE(offsets.numel() == num_lists + 1 && num_full.numel() == num_lists, name,
                    " block lists: expected ", num_lists + 1, " offsets and ", num_lists,
                    " full counts, got ", offsets.numel(), " and ", num_full.numel());
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const int32_t* full = num_full.data_ptr<int32_t>();
  // Lists built on a device have a fixed capacity: entries past the last offset are unused.
  TORCH_CHECK_VALUE(off[0] == 0 && off[num_lists] <= indices.numel(), name,
                    " block lists: offsets must run from 0 to at most the number of indices");
  // last_list[b] == list once block b was seen in that list: a repeat would be counted twice.
  std::vector<int64_t> last_list(blocks_across, -1);
  for (int64_t list = 0; list < num_lists; ++list) {
    const int64_t begin = off[list], end = off[list + 1];
    TORCH_CHECK_VALUE(begin <= end && full[list] >= 0 && full[list] <= end - begin, name,
                      " block lists: list ", list, " has bad offsets or full count");
    const int64_t along = list % blocks_along;
    // Packed lists are per document (list batch = documents); a batch's lengths are shared.
    const Sequence seq = p.sequence(p.packed() ? list / blocks_along / p.layout_heads : 0);
    const int64_t seq_q_blocks = seq.q_blocks(p.block_size), seq_k_blocks = seq.k_blocks(p.block_size);
    const int64_t seq_across = rows ? seq_k_blocks : seq_q_blocks;
    TORCH_CHECK_VALUE(along < (rows ? seq_q_blocks : seq_k_blocks) || begin == end, name,
                      " block lists: list ", list, " lies past its document's blocks but is not empty");
    for (int64_t e = begin; e < end; ++e) {
      TORCH_CHECK_VALUE(idx[e] >= 0 && idx[e] < seq_across, name, " block lists: index ",
                        idx[e], " out of range [0, ", seq_across, ")");
      TORCH_CHECK_VALUE(last_list[idx[e]] != list, name, " block lists: block ", idx[e],
                        " appears twice in list ", list);
      last_list[idx[e]] = list;
      if (e < begin + full[list]) {
        const int64_t qb = rows ? along : idx[e], kb = rows ? idx[e] : along;
        TORCH_CHECK_VALUE(
            classify_block(qb, kb, seq.q_len, seq.k_len, p.block_size, seq.window) ==
                BlockKind::kFull,
            name,
            " block lists: block (", qb, ", ", kb, ") is listed as full but needs an element mask");
      }
    }
  }
}

}  // namespace sparse_attention
