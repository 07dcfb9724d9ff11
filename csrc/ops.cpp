// Schemas of every sparse_attention op. Device implementations register in
// csrc/cpu/attention_cpu.cpp and csrc/cuda/; autograd and fake kernels in sparse_attention/ops.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "block_lists.h"

// The score terms (score_terms.h), optional: a sink logit per head [H]; ALiBi slopes [H] or
// [B, H]; a relative position bias table [H, num_buckets] with the bucket of every distance
// key - query - (k_len - q_len) from -(k_len - 1) to q_len - 1 (int [q_len + k_len - 1]);
// softcap (0 = none); attention dropout with the Philox seed (philox.h).
#define SA_SCORE_TERMS                                                                          \
  "Tensor? sinks=None, Tensor? alibi_slopes=None, Tensor? position_bias=None, "                \
  "Tensor? position_buckets=None, float softcap=0., float dropout_p=0., SymInt seed=0"

TORCH_LIBRARY(sparse_attention, m) {
  // Converts a bool block mask [layout_heads, q_blocks, k_blocks] into row and column block
  // lists (CSR, int32, full blocks first in each list) for the given lengths and window.
  m.def(
      "build_block_lists(Tensor block_mask, int q_len, int k_len, int block_size, "
      "int window_left, int window_right) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The BlockKind of every (query block, key block) pair under the element rules, uint8
  // [q_blocks, k_blocks] (0 skip, 1 full, 2 partial): depends on the shapes and window only,
  // so layouts held as device tensors build their lists from it without a host sync.
  // No tensor argument to dispatch on: one kernel for every device (it returns a CPU tensor).
  m.def("block_kinds(int q_len, int k_len, int block_size, int window_left, int window_right) -> Tensor",
        &sparse_attention::block_kinds);
  // (out, lse) of block-sparse attention. window_left/right < 0 mean unbounded;
  // causal is window_right = 0. key_padding_mask: bool [B, Nk], True = ignore. The forward
  // pass walks the row lists only; it takes the column lists so autograd can hand them to
  // the backward op. deterministic: the backward pass must give bit-identical gradients run
  // to run (CUDA then computes dQ in a pass over the rows instead of with atomics); forward
  // takes it so autograd can hand it on. The CPU kernels are always deterministic.
  // cuda_kernels: 'auto', 'hopper' or 'mma', which CUDA kernels run the call (CudaKernels in
  // input_checks.h); checked everywhere, used on CUDA only.
  // cu_seqlens_q, cu_seqlens_k: packed documents (both or neither), int32/int64 [documents + 1]
  // token starts in q and in k, as FlashAttention's varlen; q, k, v then hold one batch entry,
  // every document is attended alone with its own block grid, and the lists hold one list set
  // per document ([documents, layout heads, blocks], blocks at least the longest document's).
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor row_offsets, Tensor row_indices, "
      "Tensor row_num_full, Tensor col_offsets, Tensor col_indices, Tensor col_num_full, "
      "Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int block_size, "
      "float scale, int window_left, int window_right, bool deterministic=False, "
      "str cuda_kernels='auto', " SA_SCORE_TERMS ") -> (Tensor, Tensor)");
  // Attention probability mass of every computed block pair, float32 [B, H, q_blocks,
  // k_blocks]: the sum over the block of exp(q k^T * scale - lse), with the forward's lse and
  // the element rules; 0 where the row lists have no block. Not differentiable.
  m.def(
      "block_mass(Tensor q, Tensor k, Tensor lse, Tensor row_offsets, Tensor row_indices, "
      "Tensor row_num_full, Tensor? key_padding_mask, int block_size, float scale, "
      "int window_left, int window_right) -> Tensor");
  // (grad_q, grad_k, grad_v, grad_sinks, grad_alibi_slopes, grad_position_bias); grad_lse may
  // be None; the gradient of a term the call did not have is an empty tensor.
  m.def(
      "backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor row_offsets, Tensor row_indices, Tensor row_num_full, "
      "Tensor col_offsets, Tensor col_indices, Tensor col_num_full, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int block_size, float scale, "
      "int window_left, int window_right, bool deterministic=False, str cuda_kernels='auto', "
      SA_SCORE_TERMS ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// forward's autograd lives in Python (sparse_attention/ops.py); the backward op itself is not
// differentiable, so double backward raises instead of silently returning zeros.
TORCH_LIBRARY_IMPL(sparse_attention, Autograd, m) {
  m.impl("backward", torch::autograd::autogradNotImplementedFallback());
}
