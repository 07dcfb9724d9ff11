// Plain parameters of the CUDA kernels. No torch or CUDA types: the host code in
// attention_cuda.cpp fills it after checking every input, and the kernels take it by value.
#pragma once

#include <cstdint>

#include "../block_rules.h"
#include "../operand.h"

namespace sparse_attention::cuda {

// Operands: unit stride along D and rows 16-byte aligned (cp.async copies 16 bytes).
using sparse_attention::Operand;

// CSR lists over (list batch, layout head, block), read on the device (see list_index). `nnz` bounds every index read:
// the host checks only shapes (scanning the contents would cost a device sync per call),
// so kernels clamp offsets to [0, nnz] and skip indices outside the block grid.
struct DeviceLists {
  const int32_t* offsets = nullptr;
  const int32_t* indices = nullptr;
  int32_t nnz = 0;
};

enum class DType { kHalf, kBFloat16 };

struct Params {
  int batch = 0, heads = 0, kv_heads = 0, q_len = 0, k_len = 0, head_dim = 0;  // of the tensors
  // The grid's z: the batch entries, or packed documents (of batch entry 0) when q_starts and
  // k_starts ([documents + 1] token starts, on the device) are set; see sequence_at.
  int sequences = 0;
  const int64_t* q_starts = nullptr;
  const int64_t* k_starts = nullptr;
  int block_size = 0, q_blocks = 0, k_blocks = 0;
  int list_batch = 1, layout_heads = 1;  // lists over [list_batch, layout_heads, blocks]
  float scale = 1.f;
  float scale_log2 = 1.f;  // scale * log2(e): scores live in base-2 units inside the kernels
  Window window;
  const uint8_t* key_padding = nullptr;      // [batch, k_len], 1 = ignore; null = none
  const uint8_t* key_block_state = nullptr;  // [batch, k_blocks] KeyBlockState; null = none

  Operand q, k, v, out_in, grad_out;  // out_in and grad_out: backward only
  DeviceLists rows, cols;

  void* out = nullptr;            // contiguous [B, H, Nq, D], input dtype
  float* lse = nullptr;           // contiguous [B, H, Nq]
  const float* grad_lse = nullptr;  // [B, H, Nq] or null
  float* delta = nullptr;         // scratch [B, H, Nq]: rowsum(dO * O) - grad_lse
  float* grad_q_accum = nullptr;  // [B, H, Nq, D] fp32, zeroed: dQ / scale by atomics
  void* grad_q = nullptr;         // contiguous [B, H, Nq, D] (dQ pass only)
  void* grad_k = nullptr;         // contiguous [B, Hkv, Nk, D]
  void* grad_v = nullptr;
  bool grad_q_pass = false;       // dQ by its own pass over the rows, not by atomics
};

// Entry points, one explicit instantiation per (dtype, head dim) in instantiations/*.cu.
// Each dispatches on block_size and launches on `stream` (a cudaStream_t).
template <DType kDType, int kHeadDim>
void run_forward(const Params& p, void* stream);
template <DType kDType, int kHeadDim>
void run_backward(const Params& p, void* stream);
// The backward's pieces that the Hopper backward reuses, instantiated beside run_backward so
// that their kernels are compiled once: delta, and the deterministic dQ pass over the rows.
template <DType kDType, int kHeadDim>
void run_delta(const Params& p, void* stream);
template <DType kDType, int kHeadDim>
void run_grad_q_pass(const Params& p, void* stream);

}  // namespace sparse_attention::cuda
