// Host side of the CPU ops: checks every input (these ops are callable directly through
// torch.ops, so nothing here trusts the Python layer), fills the plain params structs and
// runs the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../block_lists.h"
#include "../size_limits.h"
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

void check_operand(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-d tensor [batch, heads, seq_len, head_dim], got ",
                    t.dim(), " dims");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   name, ": expected float32, float64, float16 or bfloat16, got ", dtype);
}

// Validates q, k, v, the window and the padding mask and describes the problem.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_padding_mask, int64_t block_size,
                     double scale, int64_t window_left, int64_t window_right) {
  check_operand("q", q);
  check_operand("k", k);
  check_operand("v", v);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k, v: expected the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(3) == q.size(3),
                    "k: expected batch and head_dim of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k: kv heads (", k.size(1),
                    ") must divide the query heads (", q.size(1), ")");
  TORCH_CHECK_VALUE(q.size(2) > 0 && k.size(2) > 0, "q, k: sequence lengths must be >= 1");
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "q: head_dim must be in [1, ",
                    kMaxHeadDim, "] on CPU, got ", q.size(3));
  check_size_limits(q.size(2), k.size(2), block_size);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "window: bounds must be >= 0, or -1 for unbounded");
  Problem p;
  p.dtype = q.scalar_type();
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = q.size(2);
  p.k_len = k.size(2);
  p.head_dim = q.size(3);
  p.block_size = block_size;
  p.q_blocks = (p.q_len + block_size - 1) / block_size;
  p.k_blocks = (p.k_len + block_size - 1) / block_size;
  p.scale = scale;
  p.window.left = window_left;
  p.window.right = window_right;
  p.window.offset = p.k_len - p.q_len;
  if (key_padding_mask) {
    const at::Tensor& pad = *key_padding_mask;
    TORCH_CHECK_TYPE(pad.scalar_type() == at::kBool, "key_padding_mask: expected a bool tensor, got ",
                     pad.scalar_type());
    TORCH_CHECK_VALUE(pad.dim() == 2 && pad.size(0) == p.batch && pad.size(1) == p.k_len &&
                          pad.device().is_cpu(),
                      "key_padding_mask: expected a CPU tensor [", p.batch, ", ", p.k_len, "], got ",
                      pad.sizes(), " on ", pad.device());
  }
  return p;
}

// Layout heads implied by the row lists: one shared layout or one per query head.
int64_t layout_heads(const Problem& p) { return p.per_head_layout ? p.heads : 1; }

void set_layout_heads(Problem* p, const at::Tensor& row_offsets) {
  const int64_t lists = row_offsets.numel() - 1;
  TORCH_CHECK_VALUE(lists > 0 && lists % p->q_blocks == 0 &&
                        (lists / p->q_blocks == 1 || lists / p->q_blocks == p->heads),
                    "row_offsets: expected 1 + q_blocks * (1 or heads) = 1 + ", p->q_blocks,
                    " * (1 or ", p->heads, ") entries, got ", row_offsets.numel());
  p->per_head_layout = lists / p->q_blocks != 1;
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

// make_problem, plus the layout heads and the row lists every op walks, checked.
Problem make_problem_with_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding_mask,
                               int64_t block_size, double scale, int64_t window_left,
                               int64_t window_right, const at::Tensor& row_offsets,
                               const at::Tensor& row_indices, const at::Tensor& row_num_full) {
  Problem p = make_problem(q, k, v, key_padding_mask, block_size, scale, window_left, window_right);
  set_layout_heads(&p, row_offsets);
  check_block_lists("row", row_offsets, row_indices, row_num_full, layout_heads(p) * p.q_blocks,
                    p.q_blocks, p.k_blocks, true, p.q_len, p.k_len, block_size, p.window);
  return p;
}

at::ScalarType accum_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

BlockLists lists_of(const at::Tensor& offsets, const at::Tensor& indices, const at::Tensor& num_full) {
  return BlockLists{offsets.data_ptr<int32_t>(), indices.data_ptr<int32_t>(), num_full.data_ptr<int32_t>()};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& row_offsets, const at::Tensor& row_indices, const at::Tensor& row_num_full,
    const at::Tensor& /*col_offsets*/, const at::Tensor& /*col_indices*/,
    const at::Tensor& /*col_num_full*/, const std::optional<at::Tensor>& key_padding_mask,
    int64_t block_size, double scale, int64_t window_left, int64_t window_right) {
  Problem p = make_problem_with_rows(q_in, k_in, v_in, key_padding_mask, block_size, scale,
                                     window_left, window_right, row_offsets, row_indices,
                                     row_num_full);
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
  forward(f);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& row_offsets,
    const at::Tensor& row_indices, const at::Tensor& row_num_full, const at::Tensor& col_offsets,
    const at::Tensor& col_indices, const at::Tensor& col_num_full,
    const std::optional<at::Tensor>& key_padding_mask, int64_t block_size, double scale,
    int64_t window_left, int64_t window_right) {
  Problem p = make_problem_with_rows(q_in, k_in, v_in, key_padding_mask, block_size, scale,
                                     window_left, window_right, row_offsets, row_indices,
                                     row_num_full);
  check_block_lists("column", col_offsets, col_indices, col_num_full, layout_heads(p) * p.k_blocks,
                    p.k_blocks, p.q_blocks, false, p.q_len, p.k_len, block_size, p.window);
  TORCH_CHECK_VALUE(out_in.sizes() == q_in.sizes() && grad_out_in.sizes() == q_in.sizes(),
                    "out, grad_out: expected the shape of q ", q_in.sizes(), ", got ",
                    out_in.sizes(), " and ", grad_out_in.sizes());
  TORCH_CHECK_TYPE(out_in.scalar_type() == p.dtype && grad_out_in.scalar_type() == p.dtype,
                   "out, grad_out: expected dtype ", p.dtype);
  const at::ScalarType acc = accum_dtype(p.dtype);
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.q_len};
  TORCH_CHECK_VALUE(lse_in.sizes() == lse_shape && lse_in.scalar_type() == acc,
                    "lse: expected ", acc, " ", lse_shape, ", got ", lse_in.scalar_type(), " ",
                    lse_in.sizes());
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in) {
    TORCH_CHECK_VALUE(grad_lse_in->sizes() == lse_shape, "grad_lse: expected shape ", lse_shape,
                      ", got ", grad_lse_in->sizes());
    grad_lse = grad_lse_in->to(acc).contiguous();
  }
  for (const auto* t : {&out_in, &grad_out_in, &lse_in}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "out, grad_out, lse: expected CPU tensors");
  }
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
                   out = unit_last_stride(out_in), grad_out = unit_last_stride(grad_out_in);
  at::Tensor mask_bytes;
  std::vector<uint8_t> block_state;
  attach_padding(&p, key_padding_mask, &mask_bytes, &block_state);

  at::Tensor grad_q = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_k = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_v = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor delta = at::empty(lse_shape, lse.options());
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
  backward(g);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attention, CPU, m) {
  m.impl("build_block_lists", &build_block_lists);
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace sparse_attention::cpu
