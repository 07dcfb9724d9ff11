// Checks of the ops' tensor arguments that hold on every device, and the Problem they
// describe. The ops are callable directly through torch.ops, so no device's host code
// trusts the Python layer; each calls these first, then adds its own limits (head dims,
// dtypes, block sizes its kernels support).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <c10/util/string_view.h>

#include <optional>

#include "kernel_choice.h"
#include "problem.h"

namespace sparse_attention {

// The ops' cuda_kernels argument ('auto', 'hopper' or 'mma'); a ValueError names it otherwise.
CudaKernels parse_cuda_kernels(c10::string_view name);

// q, k, v: 4-d, on `device`, a floating dtype.
void check_operand(const char* name, const at::Tensor& t, c10::DeviceType device);

// Validates q, k, v, the window and the padding mask and describes the problem.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_padding_mask, int64_t block_size,
                     double scale, int64_t window_left, int64_t window_right,
                     c10::DeviceType device);

// The lists' batch and heads, from the full counts [list batch, layout heads, blocks] of the
// row and column lists (the column lists may be undefined: forward passes take rows only).
void set_list_shape(Problem* p, const at::Tensor& row_num_full, const at::Tensor& col_num_full);

// fp64 for fp64 inputs, else fp32: the dtype of lse and of the kernels' accumulators.
at::ScalarType accum_dtype(at::ScalarType dtype);

// The backward op's out, grad_out, lse and grad_lse against the problem of q, k, v.
void check_backward_operands(const Problem& p, const at::Tensor& q, const at::Tensor& out,
                             const at::Tensor& grad_out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& grad_lse, c10::DeviceType device);

}  // namespace sparse_attention
