// Host side of the CPU ops: checks every input (these ops are callable directly through
// torch.ops, so nothing here trusts the Python layer), fills the plain params structs and
// runs the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../block_lists.h"
#include "../input_checks.h"
#include "../packed_sequences.h"
#include "../score_terms.h"
#include "kernels.h"

namespace sparse_attention::cpu {

namespace {

constexpr int64_t kMaxHeadDim = 256;

Operand operand(const at::Tensor& t) {
  return Operand{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Kernels need a unit stride along the head dimension only.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// Summarises the padding mask per (batch, key block) so kernels skip padded blocks and
// mask only mixed ones. Fills `state` and points the problem at it and at `mask_bytes`.
void attach_padding(Problem* p, const std::optional<at::Tensor>& key_padding_mask,
                    at::Tensor* mask_bytes, std::vector<uint8_t>* state) {
  if (!key_padding_mask) return;
  *mask_bytes = key_padding_mask->to(at::kByte).contiguous();
  const uint8_t* m = mask_bytes->data_ptr<uint8_t>();
  state->assign(p->batch * p->k_blocks, 0);
  for (int64_t b = 0; b < p->batch; ++b) {
    for (int64_t kb = 0; kb < p->k_blocks; ++kb) {
      const int64_t k0 = kb * p->block_size, k1 = std::min(k0 + p->block_size, p->k_len);
      int64_t padded = 0;
      for (int64_t j = k0; j < k1; ++j) padded += m[b * p->k_len + j] != 0;
      const auto s = padded == 0          ? KeyBlockState::kAllValid
                     : padded == k1 - k0 ? KeyBlockState::kAllPadded
                                         : KeyBlockState::kMixed;
      (*state)[b * p->k_blocks + kb] = static_cast<uint8_t>(s);
    }
  }
  p->key_padding = m;
  p->key_block_state = state->data();
}

// make_problem, plus packed documents (their tables kept in `packed`), the lists' batch and
// heads and the row lists every op walks, checked.
Problem make_problem_with_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& cu_seqlens_q,
                               const std::optional<at::Tensor>& cu_seqlens_k, PackedSequences* packed,
                               int64_t block_size, double scale, int64_t window_left,
                               int64_t window_right, const at::Tensor& row_offsets,
                               const at::Tensor& row_indices, const at::Tensor& row_num_full,
                               const at::Tensor& col_num_full) {
  Problem p = make_problem(q, k, v, key_padding_mask, block_size, scale, window_left,
                           window_right, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim, "q: head_dim must be in [1, ",
                    kMaxHeadDim, "] on CPU, got ", p.head_dim);
  attach_packed_sequences(&p, cu_seqlens_q, cu_seqlens_k, key_padding_mask.has_value(), packed);
  set_list_shape(&p, row_num_full, col_num_full);
  check_block_lists("row", row_offsets, row_indices, row_num_full, p, true);
  return p;
}

BlockLists lists_of(const at::Tensor& offsets, const at::Tensor& indices, const at::Tensor& num_full) {
  return BlockLists{offsets.data_ptr<int32_t>(), indices.data_ptr<int32_t>(), num_full.data_ptr<int32_t>()};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& row_offsets, const at::Tensor& row_indices, const at::Tensor& row_num_full,
    const at::Tensor& /*col_offsets*/, const at::Tensor& /*col_indices*/,
    const at::Tensor& col_num_full, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t block_size, double scale, int64_t window_left, int64_t window_right,
    bool /*deterministic: the CPU kernels always are*/, c10::string_view cuda_kernels,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& position_bias, const std::optional<at::Tensor>& position_buckets,
    double softcap, double dropout_p, c10::SymInt seed) {
  parse_cuda_kernels(cuda_kernels);  // checked, not used here
  PackedSequences packed;
  Problem p = make_problem_with_rows(q_in, k_in, v_in, key_padding_mask, cu_seqlens_q,
                                     cu_seqlens_k, &packed, block_size, scale, window_left,
                                     window_right, row_offsets, row_indices, row_num_full,
                                     col_num_full);
  const ScoreTermTensors terms = check_score_terms(p, sinks, alibi_slopes, position_bias, position_buckets,
                                                   softcap, dropout_p, seed.expect_int(), c10::DeviceType::CPU);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor mask_bytes;
  std::vector<uint8_t> block_state;
  attach_padding(&p, key_padding_mask, &mask_bytes, &block_state);

  at::Tensor out = at::empty({p.batch, p.heads, p.q_len, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(accum_dtype(p.dtype)));
  ForwardParams f;
  f.problem = p;
  f.q = operand(q);
  f.k = operand(k);
  f.v = operand(v);
  f.out = out.data_ptr();
  f.lse = lse.data_ptr();
  f.rows = lists_of(row_offsets, row_indices, row_num_full);
  f.terms = terms.terms;
  forward(f);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& row_offsets,
    const at::Tensor& row_indices, const at::Tensor& row_num_full, const at::Tensor& col_offsets,
    const at::Tensor& col_indices, const at::Tensor& col_num_full,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t block_size, double scale, int64_t window_left, int64_t window_right,
    bool /*deterministic: the CPU kernels always are*/, c10::string_view cuda_kernels,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& position_bias, const std::optional<at::Tensor>& position_buckets,
    double softcap, double dropout_p, c10::SymInt seed) {
  parse_cuda_kernels(cuda_kernels);  // checked, not used here
  PackedSequences packed;
  Problem p = make_problem_with_rows(q_in, k_in, v_in, key_padding_mask, cu_seqlens_q,
                                     cu_seqlens_k, &packed, block_size, scale, window_left,
                                     window_right, row_offsets, row_indices, row_num_full,
                                     col_num_full);
  const ScoreTermTensors terms = check_score_terms(p, sinks, alibi_slopes, position_bias, position_buckets,
                                                   softcap, dropout_p, seed.expect_int(), c10::DeviceType::CPU);
  check_block_lists("column", col_offsets, col_indices, col_num_full, p, false);
  check_backward_operands(p, q_in, out_in, grad_out_in, lse_in, grad_lse_in, c10::DeviceType::CPU);
  const at::ScalarType acc = accum_dtype(p.dtype);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in) grad_lse = grad_lse_in->to(acc).contiguous();
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
                   out = unit_last_stride(out_in), grad_out = unit_last_stride(grad_out_in);
  at::Tensor mask_bytes;
  std::vector<uint8_t> block_state;
  attach_padding(&p, key_padding_mask, &mask_bytes, &block_state);

  at::Tensor grad_q = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_k = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_v = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor delta = at::empty({p.batch, p.heads, p.q_len}, lse.options());
  BackwardParams g;
  g.problem = p;
  g.q = operand(q);
  g.k = operand(k);
  g.v = operand(v);
  g.out = operand(out);
  g.grad_out = operand(grad_out);
  g.lse = lse.data_ptr();
  g.grad_lse = grad_lse.defined() ? grad_lse.data_ptr() : nullptr;
  g.delta = delta.data_ptr();
  g.grad_q = grad_q.data_ptr();
  g.grad_k = grad_k.data_ptr();
  g.grad_v = grad_v.data_ptr();
  g.rows = lists_of(row_offsets, row_indices, row_num_full);
  g.cols = lists_of(col_offsets, col_indices, col_num_full);
  g.terms = terms.terms;
  // In the accumulation type, returned in the terms' own dtypes.
  at::Tensor grad_sinks = term_gradient(terms.sinks), grad_alibi = term_gradient(terms.alibi_slopes),
             grad_bias = term_gradient(terms.position_bias);
  g.grad_sinks = grad_sinks.defined() ? grad_sinks.data_ptr() : nullptr;
  g.grad_alibi_slopes = grad_alibi.defined() ? grad_alibi.data_ptr() : nullptr;
  g.grad_position_bias = grad_bias.defined() ? grad_bias.data_ptr() : nullptr;
  backward(g);
  const auto as_given = [](const at::Tensor& grad, const std::optional<at::Tensor>& term) {
    return grad.defined() ? grad.to(term->scalar_type()) : at::empty({0}, at::kFloat);
  };
  return {grad_q, grad_k, grad_v, as_given(grad_sinks, sinks), as_given(grad_alibi, alibi_slopes),
          as_given(grad_bias, position_bias)};
}

at::Tensor block_mass_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse_in,
                          const at::Tensor& row_offsets, const at::Tensor& row_indices,
                          const at::Tensor& row_num_full,
                          const std::optional<at::Tensor>& key_padding_mask, int64_t block_size,
                          double scale, int64_t window_left, int64_t window_right) {
  PackedSequences unused;
  Problem p = make_problem_with_rows(q_in, k_in, k_in, key_padding_mask, std::nullopt,
                                     std::nullopt, &unused, block_size, scale, window_left,
                                     window_right, row_offsets, row_indices, row_num_full,
                                     at::Tensor());
  const at::ScalarType acc = accum_dtype(p.dtype);
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.q_len};
  TORCH_CHECK_VALUE(lse_in.sizes() == lse_shape && lse_in.scalar_type() == acc &&
                        lse_in.device().is_cpu(),
                    "lse: expected ", acc, " ", lse_shape, " on the CPU (the op's), got ",
                    lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), lse = lse_in.contiguous();
  at::Tensor mask_bytes;
  std::vector<uint8_t> block_state;
  attach_padding(&p, key_padding_mask, &mask_bytes, &block_state);
  at::Tensor mass = at::zeros({p.batch, p.heads, p.q_blocks, p.k_blocks}, q.options().dtype(at::kFloat));
  BlockMassParams m;
  m.problem = p;
  m.q = operand(q);
  m.k = operand(k);
  m.lse = lse.data_ptr();
  m.mass = mass.data_ptr<float>();
  m.rows = lists_of(row_offsets, row_indices, row_num_full);
  block_mass(m);
  return mass;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attention, CPU, m) {
  m.impl("build_block_lists", &build_block_lists);
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("block_mass", &block_mass_cpu);
}

}  // namespace sparse_attention::cpu
