// Compile-time shape of each kernel: tile sizes, warps, shared memory. A layout block of
// kBlockSize keys is walked as kBlockSize / kKeyTile key tiles, so the register and shared
// memory budget does not grow with the block size.
#pragma once

#include <cstddef>

namespace sparse_attention::cuda {

constexpr int kKeyTile = 64;        // keys per tile (forward, dQ pass) and per dK/dV thread block
constexpr int kQueryTile = 64;      // queries per tile in the dK/dV pass
constexpr int kRowsPerWarp = 16;    // one m16 MMA row tile per warp
constexpr int kMaxSharedBytes = 227 * 1024;  // sm_90 opt-in limit; the host checks the device's

template <typename Element_, int kHeadDim_, int kBlockSize_>
struct KernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockSize = kBlockSize_;
  static constexpr int kSubTiles = kBlockSize / kKeyTile;  // key (or query) tiles per layout block

  static_assert(kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 128, "head dims 32, 64, 128");
  static_assert(kBlockSize == 64 || kBlockSize == 128, "block sizes 64 and 128");
  static_assert(sizeof(Element) == 2, "fp16 or bf16 operands");

  // Row kernels (forward, dQ pass): a thread block per query block, a warp per 16
  // query rows; Q (and dO) stay in shared memory, K and V tiles are double buffered.
  static constexpr int kRowWarps = kBlockSize / kRowsPerWarp;
  static constexpr int kRowThreads = kRowWarps * 32;
  static constexpr int kQTileElems = kBlockSize * kHeadDim;
  static constexpr int kKVTileElems = kKeyTile * kHeadDim;
  static constexpr size_t kForwardSmem = (kQTileElems + 4 * kKVTileElems) * sizeof(Element);
  static constexpr size_t kGradQSmem = (2 * kQTileElems + 4 * kKVTileElems) * sizeof(Element);

  // Column kernel (dK, dV and atomic dQ): a thread block per kKeyTile keys, a warp per 16
  // keys; K and V stay in shared memory, Q and dO tiles (with their lse and delta) are
  // double buffered; dS^T goes through shared memory for the atomic dQ product, last, so that
  // a launch before the dQ pass (which has no atomic product) leaves it out: at head dim 128
  // that fits the 99 KB of sm_86, sm_89 and sm_120.
  static constexpr int kColWarps = kKeyTile / kRowsPerWarp;
  static constexpr int kColThreads = kColWarps * 32;
  static constexpr int kQueryTileElems = kQueryTile * kHeadDim;
  static constexpr size_t kGradKVBeforeDqPassSmem =
      (2 * kKVTileElems + 4 * kQueryTileElems) * sizeof(Element) + 4 * kQueryTile * sizeof(float);
  static constexpr size_t kGradKVSmem = kGradKVBeforeDqPassSmem + kKeyTile * kQueryTile * sizeof(Element);

  static_assert(kKeyTile % 16 == 0 && kQueryTile == kColWarps * kRowsPerWarp,
                "the atomic dQ product gives each warp 16 query rows");
  static_assert(kForwardSmem <= kMaxSharedBytes && kGradQSmem <= kMaxSharedBytes &&
                    kGradKVSmem <= kMaxSharedBytes,
                "tiles fit in shared memory");
  static_assert((kQTileElems * sizeof(Element)) % 128 == 0 && (kKVTileElems * sizeof(Element)) % 128 == 0 &&
                    kGradKVBeforeDqPassSmem % 128 == 0,
                "tiles start 128-byte aligned");
};

// How a row kernel splits its query block: kRowTiles m16 row tiles per warp, which share
// every K and V fragment a warp loads (one ldmatrix feeds kRowTiles MMAs).
//   kRowTiles = 1: a warp per 16 rows, 64-key tiles (the default forward, the dQ pass).
//   kRowTiles = 2: FlashAttention-2's tiling, a warp per 32 rows (4 warps per 128-row block,
//     2 per 64-row block), two thread blocks per SM; the key tile shrinks to 32 at D = 128 so
//     that 2 x 64 output accumulators and the scores fit in 255 registers without spills.
//     Also folds the softmax scale into the exponent and launches the last (for causal-like
//     layouts the longest) query blocks first. Opt-in (see launch_forward).
template <typename Traits, int kRowTiles_>
struct RowTiling {
  static constexpr int kRowTiles = kRowTiles_;
  static constexpr bool kFa2 = kRowTiles > 1;
  static constexpr int kRows = kRowTiles * kRowsPerWarp;  // query rows per warp
  static constexpr int kWarps = Traits::kBlockSize / kRows;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocksPerSM = kFa2 ? 2 : 1;
  static constexpr int kKeyTile = !kFa2 ? cuda::kKeyTile : Traits::kHeadDim == 128 ? 32 : 64;
  static constexpr int kSubTiles = Traits::kBlockSize / kKeyTile;
  static constexpr int kKVTileElems = kKeyTile * Traits::kHeadDim;
  static constexpr size_t kForwardSmem =
      (Traits::kQTileElems + 4 * kKVTileElems) * sizeof(typename Traits::Element);

  static_assert(kRowTiles == 1 || kRowTiles == 2, "one or two m16 row tiles per warp");
  static_assert(Traits::kBlockSize % kRows == 0 && Traits::kBlockSize % kKeyTile == 0 && kKeyTile % 16 == 0,
                "warps and key tiles divide the layout block");
  static_assert(kMinBlocksPerSM * kForwardSmem <= kMaxSharedBytes, "the thread blocks of an SM fit");
  static_assert((kKVTileElems * sizeof(typename Traits::Element)) % 128 == 0, "tiles start 128-byte aligned");
  static_assert(kFa2 || (kThreads == Traits::kRowThreads && kForwardSmem == Traits::kForwardSmem &&
                         kSubTiles == Traits::kSubTiles),
                "one row tile per warp is the traits' row-kernel shape");
};

}  // namespace sparse_attention::cuda
