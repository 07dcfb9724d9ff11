#include "score_terms.h"

#include <ATen/ATen.h>

#include <cmath>

#include "input_checks.h"

namespace sparse_attention {

namespace {

// A floating tensor of the given shape on `device`, in the accumulation type, contiguous.
at::Tensor checked_term(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                        const char* shape_text, at::ScalarType acc, c10::DeviceType device) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, ": expected a floating tensor ",
                   shape_text, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape_text, " = ", shape,
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().type() == device, name, ": expected a ", c10::DeviceTypeName(device),
                    " tensor (that of q), got ", t.device());
  return t.to(acc).contiguous();
}

}  // namespace

ScoreTermTensors check_score_terms(const Problem& p, const std::optional<at::Tensor>& sinks,
                                   const std::optional<at::Tensor>& alibi_slopes,
                                   const std::optional<at::Tensor>& position_bias,
                                   const std::optional<at::Tensor>& position_buckets,
                                   double softcap, double dropout_p, int64_t seed,
                                   c10::DeviceType device) {
  const at::ScalarType acc = accum_dtype(p.dtype);
  ScoreTermTensors r;
  ScoreTerms& t = r.terms;
  if (sinks) {
    r.sinks = checked_term("sinks", *sinks, {p.heads}, "[heads]", acc, device);
    t.sinks = r.sinks.data_ptr();
  }
  if (alibi_slopes) {
    const bool per_batch = alibi_slopes->dim() == 2;
    const std::vector<int64_t> shape = per_batch ? std::vector<int64_t>{p.batch, p.heads}
                                                 : std::vector<int64_t>{p.heads};
    r.alibi_slopes = checked_term("alibi_slopes", *alibi_slopes, shape,
                                  per_batch ? "[batch, heads]" : "[heads]", acc, device);
    t.alibi_slopes = r.alibi_slopes.data_ptr();
    t.alibi_batch = per_batch ? p.batch : 1;
  }
  TORCH_CHECK_VALUE(position_bias.has_value() == position_buckets.has_value(),
                    "position_bias, position_buckets: expected both (the table and the bucket of "
                    "every distance) or neither");
  if (position_bias) {
    TORCH_CHECK_VALUE(position_bias->dim() == 2 && position_bias->size(1) >= 1,
                      "position_bias: expected a table [heads, num_buckets], got shape ",
                      position_bias->sizes());
    r.position_bias = checked_term("position_bias", *position_bias, {p.heads, position_bias->size(1)},
                                   "[heads, num_buckets]", acc, device);
    const at::Tensor& b = *position_buckets;
    const int64_t distances = p.q_len + p.k_len - 1;
    TORCH_CHECK_TYPE(b.scalar_type() == at::kInt || b.scalar_type() == at::kLong,
                     "position_buckets: expected an int32 or int64 tensor, got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == distances && b.device().type() == device,
                      "position_buckets: expected a ", c10::DeviceTypeName(device), " tensor [q_len + "
                      "k_len - 1] = [", distances, "] (the bucket of distance key - query from -(k_len - 1) "
                      "to q_len - 1), got ", b.sizes(), " on ", b.device());
    r.position_buckets = b.to(at::kInt).contiguous();
    t.num_buckets = r.position_bias.size(1);
    if (device == c10::DeviceType::CPU) {  // read by the kernels as table indices
      const auto [low, high] = at::aminmax(r.position_buckets);
      TORCH_CHECK_VALUE(low.item<int64_t>() >= 0 && high.item<int64_t>() < t.num_buckets,
                        "position_buckets: expected buckets in [0, ", t.num_buckets, "), got [",
                        low.item<int64_t>(), ", ", high.item<int64_t>(), "]");
    }
    t.position_bias = r.position_bias.data_ptr();
    t.position_buckets = r.position_buckets.data_ptr<int32_t>();
  }
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0,
                    "softcap: expected a finite number > 0 (or 0 for none), got ", softcap);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p: expected a probability in [0, 1), got ",
                    dropout_p);
  t.softcap = softcap;
  t.dropout_p = dropout_p;
  t.seed = static_cast<uint64_t>(seed);
  return r;
}

void refuse_score_terms(const char* kernels, const std::optional<at::Tensor>& sinks,
                        const std::optional<at::Tensor>& alibi_slopes,
                        const std::optional<at::Tensor>& position_bias,
                        const std::optional<at::Tensor>& position_buckets, double softcap,
                        double dropout_p) {
  const char* given = sinks ? "sinks"
                      : alibi_slopes ? "alibi_slopes"
                      : position_bias || position_buckets ? "position_bias"
                      : softcap != 0 ? "softcap"
                      : dropout_p != 0 ? "dropout_p"
                                       : nullptr;
  TORCH_CHECK_VALUE(given == nullptr, given, ": the ", kernels, " kernels do not take it yet (",
                    "sparse_attention.sparse_attention runs such calls densely instead; see "
                    "sparse_attention.supported)");
}

at::Tensor term_gradient(const at::Tensor& term) {
  return term.defined() ? at::zeros_like(term) : at::Tensor();
}

}  // namespace sparse_attention
