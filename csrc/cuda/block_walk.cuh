// Double-buffered walking of the block lists with cp.async (the mma.sync kernels); the
// walk itself is in list_walk.h.
#pragma once

#include "list_walk.h"
#include "tensor_core.cuh"

namespace sparse_attention::cuda {

// Runs body(buffer, step, tile_start, query_head) for every step of a walk, with the tiles of
// the next step copied (load(buffer), which reads the walk's current step) while the current
// step computes: double buffering over cp.async groups. Groups committed before the call
// (e.g. the resident Q tile) are complete when the first body runs.
template <typename Walk, typename Load, typename Body>
__device__ __forceinline__ void for_each_step_pipelined(Walk& walk, const Load& load, const Body& body) {
  if (!walk.done) load(0);
  cp_async_commit();
  for (int buffer = 0; !walk.done; buffer ^= 1) {
    const Step step = walk.step;
    const int tile_start = walk.tile_start(), query_head = walk.query_head();
    walk.next();
    if (!walk.done) load(buffer ^ 1);
    cp_async_commit();  // possibly empty, so that one wait count fits every iteration
    cp_async_wait<1>();
    __syncthreads();
    body(buffer, step, tile_start, query_head);
    __syncthreads();  // the buffer is refilled by the next iteration's copy
  }
  cp_async_wait<0>();
}

}  // namespace sparse_attention::cuda
