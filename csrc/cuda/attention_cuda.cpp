// Host side of the CUDA ops: the shared input checks, then the CUDA kernels' own limits
// (dtypes, head dims, block sizes), a plain Params struct, and the launch on the current
// stream of q's device. Registers the ops for the CUDA dispatch key.
//
// The block lists are checked for shape, dtype and device only: scanning their contents as
// the CPU ops do would copy them to the host and synchronise on every call. The kernels
// instead clamp every offset, skip indices outside the block grid and recompute each block's
// kind from the element rules, so malformed lists cannot make them read out of bounds or skip
// a needed mask.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <limits>
#include <optional>

#include "../input_checks.h"
#include "../packed_sequences.h"
#include "../score_terms.h"
#include "hopper/kernels_sm90.h"
#include "params.h"
#include "supported_cases.h"

namespace sparse_attention::cuda {

namespace {

constexpr int64_t kMaxGridYZ = 65535;  // heads and batch become grid dimensions y and z

void check_cuda_limits(const Problem& p) {
  TORCH_CHECK_TYPE(p.dtype == at::kHalf || p.dtype == at::kBFloat16,
                   "q, k, v: the CUDA kernels take float16 or bfloat16, got ", p.dtype,
                   "; run under torch.autocast(\"cuda\") or convert with .half() or .bfloat16()");
  TORCH_CHECK_VALUE(is_compiled_head_dim(p.head_dim), "q: head_dim must be one of ",
                    kHeadDimsText, " on CUDA, got ", p.head_dim);
  TORCH_CHECK_VALUE(is_compiled_block_size(p.block_size), "block_size: expected one of ",
                    kBlockSizesText, " on CUDA, got ", p.block_size);
  TORCH_CHECK_VALUE(p.heads <= kMaxGridYZ && p.batch <= kMaxGridYZ, "q: at most ", kMaxGridYZ,
                    " heads and batch entries on CUDA, got ", p.heads, " and ", p.batch);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(p.q_len + p.block_size < kIntMax && p.k_len + p.block_size < kIntMax &&
                        p.batch * p.heads * p.q_len / 4 < kIntMax,
                    "q, k: sequences too long for the CUDA kernels' 32-bit row indices");
}

// A view the kernels can copy 16 bytes at a time: unit stride along head_dim, 16-byte
// aligned start and row, head and batch strides (a broadcast stride of 0 is fine).
at::Tensor copyable(const at::Tensor& t) {
  auto ok = [](const at::Tensor& x) {
    const int64_t per16 = 16 / static_cast<int64_t>(x.element_size());
    return x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
           x.stride(0) % per16 == 0 && x.stride(1) % per16 == 0 && x.stride(2) % per16 == 0;
  };
  if (ok(t)) return t;
  at::Tensor c = t.contiguous();
  return ok(c) ? c : t.clone(at::MemoryFormat::Contiguous);
}

Operand operand(const at::Tensor& t) {
  return Operand{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

DeviceLists device_lists(const char* name, const at::Tensor& offsets, const at::Tensor& indices,
                         const at::Tensor& num_full, int64_t num_lists, const at::Device& device) {
  for (const auto* t : {&offsets, &indices, &num_full}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && (t->dim() == 1 || t == &num_full) &&
                          t->is_contiguous() && t->device() == device,
                      name, " block lists: expected contiguous int32 tensors (offsets and indices ",
                      "1-d) on ", device, ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK_VALUE(offsets.numel() == num_lists + 1 && num_full.numel() == num_lists, name,
                    " block lists: expected ", num_lists + 1, " offsets and ", num_lists,
                    " full counts, got ", offsets.numel(), " and ", num_full.numel());
  TORCH_CHECK_VALUE(indices.numel() < std::numeric_limits<int32_t>::max(), name,
                    " block lists: too many entries");
  return DeviceLists{offsets.data_ptr<int32_t>(), indices.data_ptr<int32_t>(),
                     static_cast<int32_t>(indices.numel())};
}

// Per (batch, key block) KeyBlockState of the padding mask, computed on the device.
at::Tensor key_block_states(const at::Tensor& mask_bytes, const Problem& p) {
  const int64_t padded_len = p.k_blocks * p.block_size;
  const at::Tensor counts = at::constant_pad_nd(mask_bytes.to(at::kInt), {0, padded_len - p.k_len}, 0)
                                .view({p.batch, p.k_blocks, p.block_size})
                                .sum(-1);
  at::Tensor lengths = at::full({p.k_blocks}, p.block_size, counts.options());
  lengths[-1].fill_(p.k_len - (p.k_blocks - 1) * p.block_size);
  const at::Tensor mixed = at::full({}, static_cast<int>(KeyBlockState::kMixed), counts.options());
  const at::Tensor state =
      at::where(counts == 0, static_cast<int64_t>(KeyBlockState::kAllValid),
                at::where(counts == lengths, static_cast<int64_t>(KeyBlockState::kAllPadded), mixed));
  return state.to(at::kByte).contiguous();
}

int compute_capability_major(const at::Device& device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  return major;
}

// Whether the dK/dV kernel with the dQ atomics (which stages dS^T in shared memory) fits the
// device at this head dim. Where it does not (head dim 128 on the 99 KB of sm_86, sm_89 and
// sm_120), the backward takes the dQ pass, whose dK/dV kernel needs less;
// kernel_table.cuda_backward_takes_dq_pass answers the same for sa.supported().
bool atomic_dq_fits(const at::Device& device, int64_t head_dim) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  size_t need = 0;  // the same at every block size
  switch (head_dim) {
#define SPARSE_ATTENTION_GRAD_KV_SMEM_CASE(D) \
  case D: need = KernelTraits<uint16_t, D, kKeyTile>::kGradKVSmem; break;
    SPARSE_ATTENTION_CUDA_HEAD_DIMS(SPARSE_ATTENTION_GRAD_KV_SMEM_CASE)
#undef SPARSE_ATTENTION_GRAD_KV_SMEM_CASE
  }
  return need <= static_cast<size_t>(limit);
}

// Checks and describes a call; `keep` holds the tensors the params point into.
struct Prepared {
  Problem problem;
  Params params;
  PackedSequences packed;  // the problem points into it
  std::vector<at::Tensor> keep;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& key_padding_mask,
                 const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t block_size,
                 double scale, int64_t window_left, int64_t window_right,
                 const at::Tensor& row_offsets, const at::Tensor& row_indices,
                 const at::Tensor& row_num_full, const at::Tensor& col_num_full) {
  Prepared r;
  Problem& p = r.problem;
  p = make_problem(q, k, v, key_padding_mask, block_size, scale, window_left, window_right,
                   c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "q, k, v: expected one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  check_cuda_limits(p);
  // Packed documents: their tables are checked on the host (a small copy when cu_seqlens
  // live on the device) and the starts copied to the device for the kernels.
  auto on_host = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    return t->cpu();
  };
  attach_packed_sequences(&p, on_host(cu_seqlens_q), on_host(cu_seqlens_k),
                          key_padding_mask.has_value(), &r.packed);
  TORCH_CHECK_VALUE(p.sequences() <= kMaxGridYZ, "cu_seqlens: at most ", kMaxGridYZ,
                    " documents on CUDA, got ", p.sequences());
  set_list_shape(&p, row_num_full, col_num_full);
  Params& c = r.params;
  c.rows = device_lists("row", row_offsets, row_indices, row_num_full, p.num_lists() * p.q_blocks,
                        q.device());
  c.batch = p.batch;
  c.sequences = static_cast<int>(p.sequences());
  if (p.packed()) {
    const auto starts = [&](const std::vector<int64_t>& values) {
      at::Tensor t = at::tensor(values, at::kLong).to(q.device());
      r.keep.push_back(t);
      return t.data_ptr<int64_t>();
    };
    c.q_starts = starts(r.packed.q_starts);
    c.k_starts = starts(r.packed.k_starts);
  }
  c.heads = p.heads;
  c.kv_heads = p.kv_heads;
  c.q_len = p.q_len;
  c.k_len = p.k_len;
  c.head_dim = p.head_dim;
  c.block_size = p.block_size;
  c.q_blocks = p.q_blocks;
  c.k_blocks = p.k_blocks;
  c.list_batch = static_cast<int>(p.list_batch);
  c.layout_heads = static_cast<int>(p.layout_heads);
  c.scale = static_cast<float>(scale);
  c.scale_log2 = static_cast<float>(scale * M_LOG2E);
  c.window = p.window;
  if (key_padding_mask) {
    TORCH_CHECK_VALUE(key_padding_mask->device() == q.device(),
                      "key_padding_mask: expected device ", q.device(), ", got ", key_padding_mask->device());
    const at::Tensor bytes = key_padding_mask->to(at::kByte).contiguous();
    const at::Tensor states = key_block_states(bytes, p);
    c.key_padding = bytes.data_ptr<uint8_t>();
    c.key_block_state = states.data_ptr<uint8_t>();
    r.keep.push_back(bytes);
    r.keep.push_back(states);
  }
  for (const at::Tensor* t : {&q, &k, &v}) r.keep.push_back(copyable(*t));
  c.q = operand(r.keep[r.keep.size() - 3]);
  c.k = operand(r.keep[r.keep.size() - 2]);
  c.v = operand(r.keep[r.keep.size() - 1]);
  return r;
}

DType kernel_dtype(at::ScalarType dtype) { return dtype == at::kHalf ? DType::kHalf : DType::kBFloat16; }

template <bool kForward>
void run(const Params& p, at::ScalarType dtype) {
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  auto by_dim = [&](auto dtype_tag) {
    constexpr DType kDType = decltype(dtype_tag)::value;
    switch (p.head_dim) {
#define SPARSE_ATTENTION_HEAD_DIM_CASE(D) \
  case D: return kForward ? run_forward<kDType, D>(p, stream) : run_backward<kDType, D>(p, stream);
      SPARSE_ATTENTION_CUDA_HEAD_DIMS(SPARSE_ATTENTION_HEAD_DIM_CASE)
#undef SPARSE_ATTENTION_HEAD_DIM_CASE
      default: TORCH_CHECK_VALUE(false, "q: head_dim must be one of ", kHeadDimsText, " on CUDA, got ",
                                 p.head_dim);
    }
  };
  if (kernel_dtype(dtype) == DType::kHalf) {
    by_dim(std::integral_constant<DType, DType::kHalf>{});
  } else {
    by_dim(std::integral_constant<DType, DType::kBFloat16>{});
  }
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_offsets,
    const at::Tensor& row_indices, const at::Tensor& row_num_full, const at::Tensor& /*col_offsets*/,
    const at::Tensor& /*col_indices*/, const at::Tensor& col_num_full,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t block_size, double scale, int64_t window_left, int64_t window_right,
    bool /*deterministic: the forward always is*/, c10::string_view cuda_kernels,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& position_bias, const std::optional<at::Tensor>& position_buckets,
    double softcap, double dropout_p, c10::SymInt /*seed*/) {
  refuse_score_terms("CUDA", sinks, alibi_slopes, position_bias, position_buckets, softcap, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, block_size, scale,
                       window_left, window_right,
                       row_offsets, row_indices, row_num_full, col_num_full);
  const Problem& p = r.problem;
  at::Tensor out = at::empty({p.batch, p.heads, p.q_len, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
  r.params.out = out.data_ptr();
  r.params.lse = lse.data_ptr<float>();
  if (hopper::sm90_takes(r.params, q.device().index(), parse_cuda_kernels(cuda_kernels))) {  // opt-in
    hopper::run_forward_sm90(r.params, kernel_dtype(p.dtype), c10::cuda::getCurrentCUDAStream().stream());
  } else {
    run<true>(r.params, p.dtype);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& row_offsets, const at::Tensor& row_indices, const at::Tensor& row_num_full,
    const at::Tensor& col_offsets, const at::Tensor& col_indices, const at::Tensor& col_num_full,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t block_size, double scale, int64_t window_left, int64_t window_right,
    bool deterministic, c10::string_view cuda_kernels,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& position_bias, const std::optional<at::Tensor>& position_buckets,
    double softcap, double dropout_p, c10::SymInt /*seed*/) {
  refuse_score_terms("CUDA", sinks, alibi_slopes, position_bias, position_buckets, softcap, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, block_size, scale,
                       window_left, window_right,
                       row_offsets, row_indices, row_num_full, col_num_full);
  const Problem& p = r.problem;
  Params& c = r.params;
  c.cols = device_lists("column", col_offsets, col_indices, col_num_full, p.num_lists() * p.k_blocks,
                        q.device());
  check_backward_operands(p, q, out, grad_out, lse, grad_lse, c10::DeviceType::CUDA);
  for (const at::Tensor* t : {&out, &grad_out, &lse}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), "out, grad_out, lse: expected device ", q.device());
  }
  const at::Tensor out_c = copyable(out), grad_out_c = copyable(grad_out), lse_c = lse.contiguous();
  c.out_in = operand(out_c);
  c.grad_out = operand(grad_out_c);
  c.lse = const_cast<float*>(lse_c.data_ptr<float>());  // read only in the backward kernels
  at::Tensor grad_lse_c;
  if (grad_lse) {
    TORCH_CHECK_VALUE(grad_lse->device() == q.device(), "grad_lse: expected device ", q.device());
    grad_lse_c = grad_lse->to(at::kFloat).contiguous();
    c.grad_lse = grad_lse_c.data_ptr<float>();
  }
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = at::empty(q.sizes(), contiguous);
  at::Tensor grad_k = at::empty(k.sizes(), contiguous);
  at::Tensor grad_v = at::empty(v.sizes(), contiguous);
  at::Tensor delta = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
  const bool sm90 = hopper::sm90_takes(c, q.device().index(), parse_cuda_kernels(cuda_kernels));  // opt-in
  // The dQ pass is deterministic, and with the mma.sync kernels on Hopper at head dim 128 it
  // also measured faster than their fp32 atomics (the whole backward 1.13-1.24x at N = 16k on
  // an H200, every pattern measured; benchmarks/cuda_notes.md). Elsewhere the atomics stay
  // unless asked: not measured, and the pass needs 128 KB of shared memory at block size 128;
  // but where the atomics' dK/dV kernel does not fit, the pass it is.
  const bool grad_q_pass =
      deterministic || (!sm90 && p.head_dim == 128 && compute_capability_major(q.device()) == 9) ||
      (!sm90 && !atomic_dq_fits(q.device(), p.head_dim));
  at::Tensor grad_q_accum;
  if (!grad_q_pass) {
    grad_q_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    c.grad_q_accum = grad_q_accum.data_ptr<float>();
  }
  c.delta = delta.data_ptr<float>();
  c.grad_q = grad_q.data_ptr();
  c.grad_k = grad_k.data_ptr();
  c.grad_v = grad_v.data_ptr();
  c.grad_q_pass = grad_q_pass;
  if (sm90) {
    hopper::run_backward_sm90(c, kernel_dtype(p.dtype), c10::cuda::getCurrentCUDAStream().stream());
  } else {
    run<false>(c, p.dtype);
  }
  if (!grad_q_pass) grad_q.copy_(grad_q_accum.mul_(scale));  // the final conversion
  const at::Tensor none = at::empty({0}, q.options().dtype(at::kFloat));  // no score terms here
  return {grad_q, grad_k, grad_v, none, none, none};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attention, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace sparse_attention::cuda
