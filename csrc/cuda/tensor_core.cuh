// Warp-level building blocks of the kernels: swizzled shared-memory tiles, cp.async copies,
// ldmatrix fragment loads and the m16n8k16 tensor-core MMA (fp16/bf16 in, fp32 accumulate).
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4):
//   A 16x16: a0 (row g, cols 2c..2c+1), a1 (row g+8), a2 (row g, cols 8+2c..), a3 (row g+8, 8+2c..)
//   B 16x8:  b0 (rows 2c..2c+1, col g), b1 (rows 8+2c.., col g)
//   C 16x8:  c0,c1 (row g, cols 2c, 2c+1), c2,c3 (row g+8, same cols)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sparse_attention::cuda {

// The swizzle below repeats every kSwizzleRows rows: swizzle(row + kSwizzleRows, col) ==
// swizzle(row, col) + kSwizzleRows * kCols.
constexpr int kSwizzleRows = 8;

// kCompact (template flag of the copies, fragment loads and products below): address the
// swizzled tiles from one or two per-thread offsets plus constants (and an XOR per fragment)
// rather than a register per address, for kernels at the register limit (the FA2 forward).
// The other kernels keep the addressing they were measured with.

// Element offset of (row, col) in a row-major [rows x kCols] tile whose 16-byte chunks are
// XOR-swizzled so that the 8 rows an ldmatrix phase reads hit 8 different bank groups.
template <int kCols>
__device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(kCols % 32 == 0, "tiles are at least 64 bytes wide");
  constexpr int kChunks = kCols / 8;
  constexpr int kRowsPerLine = kChunks >= 8 ? 1 : 8 / kChunks;  // rows sharing 128 bytes
  constexpr int kSpan = kChunks >= 8 ? 8 : kChunks;
  static_assert(kRowsPerLine * kSpan == kSwizzleRows, "the swizzle's period");
  const int chunk = (col >> 3) ^ ((row / kRowsPerLine) % kSpan);
  return row * kCols + chunk * 8 + (col & 7);
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; zero-fills the destination when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Copies rows [row0, row0 + kRows) of an operand (row stride in elements, unit column stride)
// into a swizzled [kRows x kCols] tile; rows at or past `rows_valid` become zeros, so that
// masked scores never meet garbage (0 * NaN) in the next product.
template <int kRows, int kCols, int kThreads, bool kCompact = false, typename Element>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* src, int64_t row_stride,
                                                int row0, int rows_valid) {
  constexpr int kChunks = kCols / 8, kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0, "every thread copies the same number of chunks");
  static_assert(!kCompact || kThreads % kChunks == 0, "compact: a thread's chunks share a column");
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    int row, col, offset;  // chunk threadIdx.x + i * kThreads: (row, col), swizzled
    if constexpr (kCompact) {
      // A thread's chunks lie `step` rows apart in one column, and whole swizzle periods of
      // `step` only add a constant: one or two swizzled offsets a thread, not one per chunk.
      const int step = i * (kThreads / kChunks);
      row = threadIdx.x / kChunks + step;
      col = threadIdx.x % kChunks * 8;
      offset = swizzle<kCols>(threadIdx.x / kChunks + step % kSwizzleRows, col) +
               step / kSwizzleRows * kSwizzleRows * kCols;
    } else {
      const int chunk = threadIdx.x + i * kThreads;
      row = chunk / kChunks;
      col = (chunk % kChunks) * 8;
      offset = swizzle<kCols>(row, col);
    }
    const bool valid = row0 + row < rows_valid;
    const Element* from = valid ? src + (row0 + row) * row_stride + col : src;
    cp_async_16(tile + offset, from, valid);
  }
}

// Shared address of the 16-byte chunk (row0 + row, col0 + col) of a swizzled [rows x kCols]
// tile, with (row, col) the lane's place in a fragment (row < 16, col 0 or 8) and (row0, col0)
// the fragment's (row0 a multiple of kSwizzleRows, col0 of 16; the tile 128-byte aligned).
// kCompact: the column offset's low chunk bits only flip the lane chunk's swizzle bits and the
// rest is a constant, so every fragment of a tile comes from one lane address (one register)
// by an XOR and an immediate offset.
template <int kCols, bool kCompact, typename Element>
__device__ __forceinline__ uint32_t fragment_address(const Element* tile, int row, int col, int row0,
                                                     int col0) {
  if constexpr (!kCompact) return smem_address(tile + swizzle<kCols>(row0 + row, col0 + col));
  constexpr int kChunks = kCols / 8, kSpan = kChunks >= 8 ? 8 : kChunks;  // as in swizzle
  const uint32_t lane_address = smem_address(tile + swizzle<kCols>(row, col));
  const int chunk0 = col0 / 8;
  return (lane_address ^ static_cast<uint32_t>((chunk0 % kSpan) * 16)) +
         static_cast<uint32_t>((row0 * kCols + chunk0 / kSpan * kSpan * 8) * sizeof(Element));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// A fragment of rows [m0, m0+16) x cols [k0, k0+16) of a row-major [M x kCols] tile.
template <int kCols, bool kCompact = false, typename Element>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Element* tile, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8, col = (lane >> 4) * 8;
  ldmatrix_x4(a, fragment_address<kCols, kCompact>(tile, row, col, m0, k0));
}

// A fragment of the 16x16 block (m0.., k0..) of A = T^T, from a tile T stored [K x kCols]
// (row = k, col = m).
template <int kCols, bool kCompact = false, typename Element>
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const Element* tile, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  const int row = (lane & 7) + (lane >> 4) * 8, col = ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(a, fragment_address<kCols, kCompact>(tile, row, col, k0, m0));
}

// B fragments of two n8 tiles (n0.., n0+8..) x k [k0, k0+16) from a tile stored [N x kCols]
// (row = n, col = k; e.g. K for S = Q K^T): b[0], b[1] for n0; b[2], b[3] for n0 + 8.
template <int kCols, bool kCompact = false, typename Element>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const Element* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  const int row = (lane & 7) + (lane >> 4) * 8, col = ((lane >> 3) & 1) * 8;
  ldmatrix_x4(b, fragment_address<kCols, kCompact>(tile, row, col, n0, k0));
}

// The same fragments from a tile stored [K x kCols] (row = k, col = n; e.g. V for O = P V),
// transposed by ldmatrix.trans.
template <int kCols, bool kCompact = false, typename Element>
__device__ __forceinline__ void load_b_transposed(uint32_t (&b)[4], const Element* tile, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8, col = (lane >> 4) * 8;
  ldmatrix_x4_trans(b, fragment_address<kCols, kCompact>(tile, row, col, k0, n0));
}

template <typename Element>
struct ElementOps;

template <>
struct ElementOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
};

template <>
struct ElementOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
};

// A [kN][4] fragment array viewed as the only row tile of a [1][kN][4] one (same layout), so
// that one-tile callers share the multi-tile products below.
template <typename T, int kN>
__device__ __forceinline__ T (&as_row_tiles(T (&x)[kN][4]))[1][kN][4] {
  return reinterpret_cast<T (&)[1][kN][4]>(x);
}

// C += A B over K = kK for kTiles 16-row A tiles (from shared, rows m0 + 16t ..) and kN
// columns of a B tile stored [N x kCols] (row = n): acc[t][j] is the C fragment of row tile t,
// columns [8j, 8j + 8). Each B fragment is loaded once and feeds all kTiles row tiles.
template <int kK, int kN, int kColsA, int kColsB, int kTiles, bool kCompact = false,
          typename Element>
__device__ __forceinline__ void gemm_a_smem_b_nk(float (&acc)[kTiles][kN / 8][4], const Element* a_tile,
                                                 int m0, const Element* b_tile, int n0) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kTiles][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) load_a<kColsA, kCompact>(a[t], a_tile, m0 + 16 * t, kk * 16);
#pragma unroll
    for (int j = 0; j < kN / 16; ++j) {
      uint32_t b[4];
      load_b<kColsB, kCompact>(b, b_tile, n0 + j * 16, kk * 16);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        ElementOps<Element>::mma(acc[t][2 * j], a[t], b[0], b[1]);
        ElementOps<Element>::mma(acc[t][2 * j + 1], a[t], b[2], b[3]);
      }
    }
  }
}

// The same for one 16-row A tile (rows m0..): acc[j] is the C fragment of columns [8j, 8j + 8).
template <int kK, int kN, int kColsA, int kColsB, typename Element>
__device__ __forceinline__ void gemm_a_smem_b_nk(float (&acc)[kN / 8][4], const Element* a_tile, int m0,
                                                 const Element* b_tile, int n0) {
  gemm_a_smem_b_nk<kK, kN, kColsA, kColsB, 1>(as_row_tiles(acc), a_tile, m0, b_tile, n0);
}

// A fragments (16 x kK) of a C-fragment tile held in registers (FlashAttention-2's trick:
// the accumulator layout of S is the operand layout of P), rounded to Element.
template <int kK, typename Element>
__device__ __forceinline__ void accumulator_to_a(uint32_t (&a)[kK / 16][4], const float (&c)[kK / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    a[kk][0] = ElementOps<Element>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = ElementOps<Element>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = ElementOps<Element>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = ElementOps<Element>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// C += A B with A in registers (kTiles row tiles of 16 x kK: a[t]) and B stored [K x kCols]
// (row = k), over all kN columns starting at column 0 of the tile; each B fragment is loaded
// once for all row tiles.
template <int kK, int kN, int kColsB, int kTiles, bool kCompact = false, typename Element>
__device__ __forceinline__ void gemm_a_regs_b_kn(float (&acc)[kTiles][kN / 8][4],
                                                 const uint32_t (&a)[kTiles][kK / 16][4],
                                                 const Element* b_tile, int k0) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int j = 0; j < kN / 16; ++j) {
      uint32_t b[4];
      load_b_transposed<kColsB, kCompact>(b, b_tile, k0 + kk * 16, j * 16);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        ElementOps<Element>::mma(acc[t][2 * j], a[t][kk], b[0], b[1]);
        ElementOps<Element>::mma(acc[t][2 * j + 1], a[t][kk], b[2], b[3]);
      }
    }
  }
}

// The same for one row tile.
template <int kK, int kN, int kColsB, typename Element>
__device__ __forceinline__ void gemm_a_regs_b_kn(float (&acc)[kN / 8][4], const uint32_t (&a)[kK / 16][4],
                                                 const Element* b_tile, int k0) {
  gemm_a_regs_b_kn<kK, kN, kColsB, 1>(as_row_tiles(acc), as_row_tiles(a), b_tile, k0);
}

// Element (j, e) of the C-fragment tile that accumulator_to_a packed into `a`.
template <typename Element, int kK>
__device__ __forceinline__ float packed_element(const uint32_t (&a)[kK / 16][4], int j, int e) {
  const float2 pair = ElementOps<Element>::unpack(a[j / 2][(j % 2) * 2 + e / 2]);
  return e % 2 == 0 ? pair.x : pair.y;
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Reduction over the 4 lanes of a quad (the lanes sharing rows g and g + 8 of a fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace sparse_attention::cuda
