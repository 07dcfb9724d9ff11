// Plain parameter structs read by the CPU kernels. No torch objects: the host code in
// attention_cpu.cpp fills them after checking every input.
#pragma once

#include <cstdint>

#include "../operand.h"
#include "../problem.h"
#include "../score_terms.h"

namespace sparse_attention::cpu {

using sparse_attention::Operand;

// CSR lists over (layout head, block): entries [offsets[r], offsets[r + 1]) of `indices`,
// the first num_full[r] of which need no element mask.
struct BlockLists {
  const int32_t* offsets = nullptr;
  const int32_t* indices = nullptr;
  const int32_t* num_full = nullptr;
};

struct ForwardParams {
  Problem problem;
  Operand q, k, v;
  void* out = nullptr;  // contiguous [B, H, Nq, D], input dtype
  void* lse = nullptr;  // contiguous [B, H, Nq], accumulation dtype
  BlockLists rows;
  ScoreTerms terms;
};

struct BlockMassParams {
  Problem problem;
  Operand q, k;
  const void* lse = nullptr;  // contiguous [B, H, Nq], accumulation dtype
  float* mass = nullptr;      // contiguous [B, H, q_blocks, k_blocks], zeroed
  BlockLists rows;
};

struct BackwardParams {
  Problem problem;
  Operand q, k, v, out, grad_out;
  const void* lse = nullptr;       // contiguous [B, H, Nq], accumulation dtype
  const void* grad_lse = nullptr;  // same shape, or null
  void* delta = nullptr;           // scratch [B, H, Nq], accumulation dtype
  void* grad_q = nullptr;          // contiguous [B, H, Nq, D], input dtype
  void* grad_k = nullptr;          // contiguous [B, Hkv, Nk, D], input dtype
  void* grad_v = nullptr;
  BlockLists rows, cols;
  ScoreTerms terms;
  // Gradients of the terms given (accumulation dtype, the terms' shapes), else null.
  void* grad_sinks = nullptr;
  void* grad_alibi_slopes = nullptr;
  void* grad_position_bias = nullptr;
};

}  // namespace sparse_attention::cpu
