// What models put inside attention besides the scaled dot product, as kernels read it. Every
// term is optional and combines with every layout and element rule:
//   score = softcap * tanh(scale q.k / softcap)     (softcap > 0; Gemma 2)
//         - slope[b, h] * |d| + table[h, bucket(d)]  (ALiBi; T5's bucketed relative bias)
// with d = key - query - offset the distance from the bottom-right aligned diagonal; then the
// element rules hide what they hide, a per-head sink logit joins every row's softmax
// denominator (gpt-oss, StreamingLLM: lse includes it, it carries no value), and dropout
// zeroes probabilities (Philox bits, philox.h) and scales the rest by 1 / (1 - p).
// Plain data: the host code (score_terms.cpp) checks the tensors and converts them to the
// accumulation type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>

#include "problem.h"

namespace sparse_attention {

struct ScoreTerms {
  const void* sinks = nullptr;         // [heads]
  const void* alibi_slopes = nullptr;  // [alibi_batch, heads]
  int64_t alibi_batch = 0;             // 1 (one set for the batch) or the batch
  const void* position_bias = nullptr;         // [heads, num_buckets]
  const int32_t* position_buckets = nullptr;   // bucket of distance d at [d + k_len - 1]
  int64_t num_buckets = 0;
  double softcap = 0;    // 0: none
  double dropout_p = 0;  // 0: none
  uint64_t seed = 0;

  bool distance_bias() const { return alibi_slopes != nullptr || position_bias != nullptr; }
  bool dropout() const { return dropout_p > 0; }
  bool any() const { return sinks != nullptr || distance_bias() || softcap > 0 || dropout(); }
};

// The op's score-term arguments, checked against the problem and held in the accumulation
// type (contiguous, on the problem's device) for as long as `terms` points into them.
struct ScoreTermTensors {
  at::Tensor sinks, alibi_slopes, position_bias, position_buckets;
  ScoreTerms terms;
};

ScoreTermTensors check_score_terms(const Problem& p, const std::optional<at::Tensor>& sinks,
                                   const std::optional<at::Tensor>& alibi_slopes,
                                   const std::optional<at::Tensor>& position_bias,
                                   const std::optional<at::Tensor>& position_buckets,
                                   double softcap, double dropout_p, int64_t seed,
                                   c10::DeviceType device);

// For kernels that take none of the terms: a ValueError naming the first one given.
void refuse_score_terms(const char* kernels, const std::optional<at::Tensor>& sinks,
                        const std::optional<at::Tensor>& alibi_slopes,
                        const std::optional<at::Tensor>& position_bias,
                        const std::optional<at::Tensor>& position_buckets, double softcap,
                        double dropout_p);

// Where the backward op returns no gradient for a term the call did not have: an empty tensor.
at::Tensor term_gradient(const at::Tensor& term);

}  // namespace sparse_attention
