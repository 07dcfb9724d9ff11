// C++ test of the CPU ops as a libtorch user sees them: through the dispatcher, checked against
// dense attention computed with ATen in float64. Returns nonzero when a check fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/kernels.h"

namespace {

using Tensor = at::Tensor;
using BlockLists = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
// Signatures from the schemas in csrc/ops.cpp.
using BuildBlockListsFn = BlockLists(const Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t);
using ForwardFn = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t, double, int64_t, int64_t,
    bool, c10::string_view, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, double, double, c10::SymInt);

int checks = 0, failures = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

struct Case {
  const char* name;
  at::ScalarType dtype;
  int64_t batch, heads, kv_heads, q_len, k_len, head_dim, block_size;
  int64_t layout_heads;  // 1 (shared layout) or heads
  int64_t window_left, window_right;
  bool key_padding;
  double tolerance;
};

// Bool [B or 1, layout_heads, Nq, Nk]: True where query i attends to key j
// (the rules of sparse_attention/reference.py).
Tensor element_mask(const Tensor& block_mask, const Case& c, const std::optional<Tensor>& pad) {
  Tensor m = block_mask.repeat_interleave(c.block_size, 1)
                 .repeat_interleave(c.block_size, 2)
                 .slice(1, 0, c.q_len)
                 .slice(2, 0, c.k_len);
  const Tensor i = at::arange(c.q_len, at::kLong).unsqueeze(1);
  const Tensor j = at::arange(c.k_len, at::kLong).unsqueeze(0);
  const Tensor dist = j - i - (c.k_len - c.q_len);
  if (c.window_left >= 0) m = m.logical_and(dist >= -c.window_left);
  if (c.window_right >= 0) m = m.logical_and(dist <= c.window_right);
  m = m.unsqueeze(0);
  if (pad) m = m.logical_and(pad->logical_not().view({c.batch, 1, 1, c.k_len}));
  return m;
}

// Dense (out, lse) in float64. Rows that see no key give out 0 and lse -inf.
std::tuple<Tensor, Tensor> dense_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& mask, double scale) {
  const int64_t group = q.size(1) / k.size(1);
  const Tensor qd = q.to(at::kDouble);
  const Tensor kd = k.to(at::kDouble).repeat_interleave(group, 1);
  const Tensor vd = v.to(at::kDouble).repeat_interleave(group, 1);
  Tensor scores = at::matmul(qd, kd.transpose(-1, -2)) * scale;
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  const Tensor unseen = mask.any(-1, /*keepdim=*/true).logical_not();
  const Tensor probs = at::softmax(scores, -1).masked_fill(unseen, 0.0);
  return {at::matmul(probs, vd), at::logsumexp(scores, -1)};
}

void run_case(const Case& c) {
  static const auto build_block_lists =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_attention::build_block_lists", "")
          .typed<BuildBlockListsFn>();
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("sparse_attention::forward", "")
                                  .typed<ForwardFn>();
  const std::string name = c.name;
  const int64_t q_blocks = (c.q_len + c.block_size - 1) / c.block_size;
  const int64_t k_blocks = (c.k_len + c.block_size - 1) / c.block_size;
  const Tensor block_mask = at::rand({c.layout_heads, q_blocks, k_blocks}) < 0.6;
  const Tensor q = at::randn({c.batch, c.heads, c.q_len, c.head_dim}, at::dtype(c.dtype));
  const Tensor k = at::randn({c.batch, c.kv_heads, c.k_len, c.head_dim}, at::dtype(c.dtype));
  const Tensor v = at::randn({c.batch, c.kv_heads, c.k_len, c.head_dim}, at::dtype(c.dtype));
  std::optional<Tensor> pad;
  if (c.key_padding) pad = at::rand({c.batch, c.k_len}) < 0.2;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));

  const auto [row_offsets, row_indices, row_num_full, col_offsets, col_indices, col_num_full] =
      build_block_lists.call(block_mask, c.q_len, c.k_len, c.block_size, c.window_left,
                             c.window_right);
  check(row_offsets.numel() == c.layout_heads * q_blocks + 1 &&
            col_offsets.numel() == c.layout_heads * k_blocks + 1 &&
            row_indices.numel() == col_indices.numel(),
        name + ": block list sizes");

  const auto [out, lse] =
      forward.call(q, k, v, row_offsets, row_indices, row_num_full, col_offsets, col_indices,
                   col_num_full, pad, std::nullopt, std::nullopt, c.block_size, scale, c.window_left, c.window_right,
                   /*deterministic=*/false, /*cuda_kernels=*/"auto", std::nullopt, std::nullopt,
                   std::nullopt, std::nullopt, /*softcap=*/0.0, /*dropout_p=*/0.0, /*seed=*/0);
  const auto [ref_out, ref_lse] = dense_attention(q, k, v, element_mask(block_mask, c, pad), scale);
  check(out.sizes() == q.sizes() && out.scalar_type() == c.dtype, name + ": out shape and dtype");

  const double out_err = (out.to(at::kDouble) - ref_out).abs().max().item<double>();
  check(out_err < c.tolerance, name + ": out max abs error " + std::to_string(out_err));

  // lse: -inf exactly where a row sees no key, close elsewhere.
  const Tensor lse_d = lse.to(at::kDouble);
  const Tensor empty_rows = at::isinf(ref_lse);
  check(at::equal(at::isinf(lse_d), empty_rows), name + ": lse is -inf on the empty rows only");
  const double lse_err =
      (lse_d - ref_lse).masked_fill(empty_rows, 0.0).abs().max().item<double>();
  check(lse_err < c.tolerance, name + ": lse max abs error " + std::to_string(lse_err));
}

void check_wrong_rank_throws() {
  const auto forward = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("sparse_attention::forward", "")
                           .typed<ForwardFn>();
  const int64_t n = 64, block_size = 32;
  const auto [ro, ri, rf, co, ci, cf] =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_attention::build_block_lists", "")
          .typed<BuildBlockListsFn>()
          .call(at::ones({1, 2, 2}, at::kBool), n, n, block_size, -1, 0);
  const Tensor kv = at::randn({1, 2, n, 16});
  const Tensor q3 = at::randn({2, n, 16});  // missing the batch dimension
  const auto throws_value_error = [&](const Tensor& q, double softcap) {
    try {
      forward.call(q, kv, kv, ro, ri, rf, co, ci, cf, std::nullopt, std::nullopt, std::nullopt,
                   block_size, 0.25, -1, 0, false, "auto", std::nullopt, std::nullopt, std::nullopt,
                   std::nullopt, softcap, 0.0, 0);
    } catch (const c10::Error& e) {
      return dynamic_cast<const c10::ValueError*>(&e) != nullptr;
    }
    return false;
  };
  check(throws_value_error(q3, 0.0), "forward with a 3-d q throws c10::ValueError");
  check(throws_value_error(at::randn({1, 2, n, 16}), -1.0), "forward with softcap < 0 throws c10::ValueError");
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::printf("test_cpu_ops: CPU kernels use %s\n", sparse_attention::cpu::kernel_capability());
  // name, dtype, B, H, Hkv, Nq, Nk, D, block_size, layout heads, window left/right, padding, tol
  const Case cases[] = {
      {"causal float32", at::kFloat, 1, 2, 2, 100, 100, 32, 32, 2, -1, 0, false, 1e-4},
      {"dense-window float64 padded", at::kDouble, 2, 2, 2, 100, 100, 32, 32, 1, -1, -1, true, 1e-10},
      {"band float32 gqa Nq<Nk", at::kFloat, 1, 4, 2, 70, 100, 32, 16, 1, 40, 10, false, 1e-4},
  };
  for (const Case& c : cases) {
    try {
      run_case(c);
    } catch (const std::exception& e) {
      check(false, std::string(c.name) + ": threw " + e.what());
    }
  }
  check_wrong_rank_throws();
  if (failures != 0) {
    std::printf("test_cpu_ops: %d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("test_cpu_ops: %d checks passed\n", checks);
  return 0;
}
