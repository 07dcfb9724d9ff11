// The bookkeeping of the Hopper kernels' pipelines, host and device code: the kernels'
// producer and consumers run these loops with mbarrier waits, and the CPU tests run the same
// loops on threads with a model of the barriers (tests/hopper_pipeline_model.cpp), so stage
// indices, phase bits and tile counts are checked without a GPU.
//
// Each of kStages stages holds two tiles (the forward: K and V of a key block; the backward:
// Q and dO of a query tile), each with a "full" barrier (completes when
// the tile has landed) and an "empty" one (completes when every consumer has released it). An
// mbarrier's wait(parity) returns once the phase of that parity has completed; a fresh barrier
// counts as having completed a phase of parity 1, so the producer's first pass over the stages
// (empty parity phase ^ 1 = 1) does not wait.
#pragma once

#include <cstdint>

#include "../list_walk.h"

namespace sparse_attention::cuda::hopper {

// The two tiles of a stage: K, V in the forward; Q, dO in the backward.
enum Channel : int { kKeys = 0, kValues = 1, kQueries = 0, kOutputGrads = 1 };

template <int kStages>
struct PipelineCursor {
  int stage = 0;
  uint32_t phase = 0;  // parity of the current pass over the stages

  SA_HOST_DEVICE void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// The walk of a query block's row list, one 128-key tile per listed key block. Producer and
// consumers each construct their own from the same Params: the same reads give the same steps.
template <int kBlock>
using RowTileWalk = BlockWalk<true, 1, kBlock>;

// The walk of a key block's column lists (every query head of the kv head's group), kTile
// query rows per step. A key block that padding hides entirely has no steps: its P is 0.
template <int kBlock, int kTile>
struct ColumnTileWalk : BlockWalk<false, kBlock / kTile, kTile> {
  SA_HOST_DEVICE ColumnTileWalk(const Params& p, const Sequence& seq, int s, int kv_head, int kb)
      : BlockWalk<false, kBlock / kTile, kTile>(p, seq, s, kv_head, kb) {
    if (key_block_state(p, seq.batch, kb) == KeyBlockState::kAllPadded) this->done = true;
  }
};

// Producer: for every step, waits for the stage to be free and fills it (load(channel, stage,
// walk) arms the full barrier and starts the copy), K before V.
template <int kStages, typename Walk, typename Sync, typename Load>
SA_HOST_DEVICE void produce(Walk& walk, Sync& sync, const Load& load) {
  PipelineCursor<kStages> cursor;
  for (; !walk.done; walk.next(), cursor.advance()) {
    sync.wait_empty(kKeys, cursor.stage, cursor.phase ^ 1);
    load(kKeys, cursor.stage, walk);
    sync.wait_empty(kValues, cursor.stage, cursor.phase ^ 1);
    load(kValues, cursor.stage, walk);
  }
}

// Consumer (the backward): for every step, first(stage, walk) once the first tile has landed,
// then second(stage, walk) once the second has; both are released at the end of the step
// (the backward's dK += dS^T Q reads Q after dO has landed).
template <int kStages, typename Walk, typename Sync, typename First, typename Second>
SA_HOST_DEVICE void consume(Walk& walk, Sync& sync, const First& first, const Second& second) {
  PipelineCursor<kStages> cursor;
  for (; !walk.done; walk.next(), cursor.advance()) {
    sync.wait_full(kKeys, cursor.stage, cursor.phase);
    first(cursor.stage, walk);
    sync.wait_full(kValues, cursor.stage, cursor.phase);
    second(cursor.stage, walk);
    sync.release(kKeys, cursor.stage);
    sync.release(kValues, cursor.stage);
  }
}

// Consumer with FlashAttention-3's intra-warpgroup overlap (the forward): the product with the
// values of step j - 1 runs on the tensor cores while the scores of step j are taken through
// the softmax. Per step j, with its stage and the previous step's (-1 for the first):
//   wait for K_j (and V_{j-1}); start(stage, previous, walk): issue S_j = Q K_j^T and
//   O += P_{j-1} V_{j-1}, then wait for S_j alone; release K_j; softmax(walk) on S_j;
//   settle(): wait for the product with V_{j-1}, rescale O, keep P_j; release V_{j-1}.
// After the last step: wait for its V; last(stage): O += P V, waited; release it.
template <int kStages, typename Walk, typename Sync, typename Start, typename Softmax, typename Settle,
          typename Last>
SA_HOST_DEVICE void consume_overlapped(Walk& walk, Sync& sync, const Start& start, const Softmax& softmax,
                                       const Settle& settle, const Last& last) {
  PipelineCursor<kStages> cursor, previous;
  bool first = true;
  for (; !walk.done; walk.next()) {
    sync.wait_full(kKeys, cursor.stage, cursor.phase);
    if (!first) sync.wait_full(kValues, previous.stage, previous.phase);
    start(cursor.stage, first ? -1 : previous.stage, walk);
    sync.release(kKeys, cursor.stage);
    softmax(walk);
    settle();
    if (!first) sync.release(kValues, previous.stage);
    previous = cursor;
    cursor.advance();
    first = false;
  }
  if (!first) {
    sync.wait_full(kValues, previous.stage, previous.phase);
    last(previous.stage);
    sync.release(kValues, previous.stage);
  }
}

// FlashAttention-3's ping-pong of the forward's two consumer warpgroups: each issues its
// step's products only after the other has issued its own, so that one's softmax runs while
// the other's products occupy the tensor cores. Barrier kFirst + w (of Barriers: arrive and
// sync by a whole warpgroup, completing when both warpgroups have) is warpgroup w's turn.
// Both walk the same list, so the turns pair up: warpgroup 0 opens its own first turn, and
// after the last step takes one more to absorb warpgroup 1's last hand-over, which leaves
// every barrier as it started.
template <typename Barriers>
struct PingPong {
  static constexpr uint32_t kFirst = 1;  // user barrier ids (CUTLASS adds its reserved count)
  const Barriers& barriers;
  bool on;
  int warpgroup;  // of the consumers: 0 or 1

  SA_HOST_DEVICE void wait_turn(bool first_step) const {
    if (!on) return;
    if (first_step && warpgroup == 0) barriers.arrive(kFirst);
    barriers.sync(kFirst + warpgroup);
  }
  SA_HOST_DEVICE void hand_over() const {
    if (on) barriers.arrive(kFirst + 1 - warpgroup);
  }
  SA_HOST_DEVICE void finish() const {
    if (on && warpgroup == 0) barriers.sync(kFirst);
  }
};

}  // namespace sparse_attention::cuda::hopper
