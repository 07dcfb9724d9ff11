// The bookkeeping of the Hopper forward's K/V pipeline, host and device code: the kernel's
// producer and consumers run these loops with mbarrier waits, and the CPU tests run the same
// loops on threads with a model of the barriers (tests/hopper_pipeline_model.cpp), so stage
// indices, phase bits and tile counts are checked without a GPU.
//
// Each of kStages stages holds a K tile and a V tile, each with a "full" barrier (completes when
// the tile has landed) and an "empty" one (completes when every consumer has released it). An
// mbarrier's wait(parity) returns once the phase of that parity has completed; a fresh barrier
// counts as having completed a phase of parity 1, so the producer's first pass over the stages
// (empty parity phase ^ 1 = 1) does not wait.
#pragma once

#include <cstdint>

#include "../list_walk.h"

namespace sparse_attention::cuda::hopper {

enum Channel : int { kKeys = 0, kValues = 1 };

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

// Consumer: for every step, scores(stage, walk) once K has landed (K is released as soon as
// the scores are in registers), then values(stage, walk) once V has.
template <int kStages, typename Walk, typename Sync, typename Scores, typename Values>
SA_HOST_DEVICE void consume(Walk& walk, Sync& sync, const Scores& scores, const Values& values) {
  PipelineCursor<kStages> cursor;
  for (; !walk.done; walk.next(), cursor.advance()) {
    sync.wait_full(kKeys, cursor.stage, cursor.phase);
    scores(cursor.stage, walk);
    sync.release(kKeys, cursor.stage);
    sync.wait_full(kValues, cursor.stage, cursor.phase);
    values(cursor.stage, walk);
    sync.release(kValues, cursor.stage);
  }
}

}  // namespace sparse_attention::cuda::hopper
