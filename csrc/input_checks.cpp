#include "input_checks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "size_limits.h"

namespace sparse_attention {

CudaKernels parse_cuda_kernels(c10::string_view name) {
  if (name == "auto") return CudaKernels::kAuto;
  if (name == "hopper") return CudaKernels::kHopper;
  if (name == "mma") return CudaKernels::kMma;
  TORCH_CHECK_VALUE(false, "cuda_kernels: expected 'auto', 'hopper' or 'mma', got '", std::string(name), "'");
}

void check_operand(const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-d tensor [batch, heads, seq_len, head_dim], got ",
                    t.dim(), " dims");
  TORCH_CHECK_VALUE(t.device().type() == device, name, ": expected a ", c10::DeviceTypeName(device),
                    " tensor, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   name, ": expected float32, float64, float16 or bfloat16, got ", dtype);
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_padding_mask, int64_t block_size,
                     double scale, int64_t window_left, int64_t window_right,
                     c10::DeviceType device) {
  check_operand("q", q, device);
  check_operand("k", k, device);
  check_operand("v", v, device);
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
                          pad.device().type() == device,
                      "key_padding_mask: expected a ", c10::DeviceTypeName(device), " tensor [",
                      p.batch, ", ", p.k_len, "], got ", pad.sizes(), " on ", pad.device());
  }
  return p;
}

void set_list_shape(Problem* p, const at::Tensor& row_num_full, const at::Tensor& col_num_full) {
  TORCH_CHECK_VALUE(row_num_full.dim() == 3, "row_num_full: expected [list batch, layout heads, ",
                    "q_blocks], got shape ", row_num_full.sizes());
  const int64_t list_batch = row_num_full.size(0), layout_heads = row_num_full.size(1);
  if (p->packed()) {
    TORCH_CHECK_VALUE(list_batch == p->documents, "block lists: packed documents need one list ",
                      "set per document (", p->documents, "), got ", list_batch);
  } else {
    TORCH_CHECK_VALUE(list_batch == 1 || list_batch == p->batch, "block lists: a layout for ",
                      list_batch, " batch entries; expected 1 (shared) or the batch of q (", p->batch, ")");
  }
  TORCH_CHECK_VALUE(layout_heads == 1 || layout_heads == p->kv_heads || layout_heads == p->heads,
                    "block lists: a layout with ", layout_heads, " heads; expected 1 (shared), the kv heads (",
                    p->kv_heads, ") or the query heads (", p->heads, ")");
  if (p->packed()) {
    // The lists' grid is padded to a common width; every document must fit in it.
    int64_t q_blocks = 0, k_blocks = 0;
    for (int64_t s = 0; s < p->documents; ++s) {
      q_blocks = std::max(q_blocks, p->sequence(s).q_blocks(p->block_size));
      k_blocks = std::max(k_blocks, p->sequence(s).k_blocks(p->block_size));
    }
    TORCH_CHECK_VALUE(row_num_full.size(2) >= q_blocks, "row_num_full: expected at least ",
                      q_blocks, " query blocks (the longest document's), got shape ",
                      row_num_full.sizes());
    p->q_blocks = row_num_full.size(2);
    const int64_t list_k_blocks = col_num_full.defined() ? col_num_full.size(-1) : k_blocks;
    TORCH_CHECK_VALUE(list_k_blocks >= k_blocks, "col_num_full: expected at least ", k_blocks,
                      " key blocks (the longest document's), got shape ", col_num_full.sizes());
    p->k_blocks = list_k_blocks;
  }
  TORCH_CHECK_VALUE(row_num_full.size(2) == p->q_blocks, "row_num_full: expected ", p->q_blocks,
                    " query blocks, got shape ", row_num_full.sizes());
  const std::vector<int64_t> columns{list_batch, layout_heads, p->k_blocks};
  TORCH_CHECK_VALUE(!col_num_full.defined() || col_num_full.sizes() == columns,
                    "col_num_full: expected shape ", columns, " (that of the row lists), got ",
                    col_num_full.sizes());
  p->list_batch = list_batch;
  p->layout_heads = layout_heads;
}

at::ScalarType accum_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_backward_operands(const Problem& p, const at::Tensor& q, const at::Tensor& out,
                             const at::Tensor& grad_out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& grad_lse, c10::DeviceType device) {
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes(),
                    "out, grad_out: expected the shape of q ", q.sizes(), ", got ", out.sizes(),
                    " and ", grad_out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == p.dtype && grad_out.scalar_type() == p.dtype,
                   "out, grad_out: expected dtype ", p.dtype);
  const at::ScalarType acc = accum_dtype(p.dtype);
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.q_len};
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.scalar_type() == acc, "lse: expected ", acc,
                    " ", lse_shape, ", got ", lse.scalar_type(), " ", lse.sizes());
  if (grad_lse) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse_shape, "grad_lse: expected shape ", lse_shape,
                      ", got ", grad_lse->sizes());
  }
  for (const auto* t : {&out, &grad_out, &lse}) {
    TORCH_CHECK_VALUE(t->device().type() == device, "out, grad_out, lse: expected ",
                      c10::DeviceTypeName(device), " tensors");
  }
}

}  // namespace sparse_attention
