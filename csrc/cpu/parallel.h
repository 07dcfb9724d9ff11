// Dynamic scheduling of independent tasks over the ATen thread pool. Rows of a sparse
// layout differ in length (global rows see every key), so a static split would leave
// threads idle; each thread instead claims the next task from a shared counter.
#pragma once

#include <cstdint>
#include <functional>

namespace sparse_attention::cpu {

// Hands out task indices 0..n-1, each once; returns -1 when none are left.
using NextTask = std::function<int64_t()>;

// Calls worker(next) once on each thread of the pool; workers keep per-thread scratch
// alive across the tasks they claim. Which thread runs a task never changes its result.
void run_parallel(int64_t num_tasks, const std::function<void(const NextTask&)>& worker);

}  // namespace sparse_attention::cpu
