// Task scheduling over ATen's intra-op thread pool.
#pragma once

#include <cstdint>
#include <functional>

namespace sparse_attention::cpu {

// Hands out the next task id to the calling thread, or -1 when none is left.
using NextTask = std::function<int64_t()>;

// Calls worker(next) once on each of min(threads, num_tasks) threads; the threads then take
// tasks one at a time, so uneven tasks balance themselves.
void run_parallel(int64_t num_tasks, const std::function<void(const NextTask&)>& worker);

// As run_parallel, but hands out the costliest tasks first (stable order among equal costs):
// rows of a layout differ in length (a global row sees every block), and a long task taken
// last would leave the other threads idle. With `section`, the tasks of section 0 come first,
// then those of section 1, and so on, longest first within each: tasks that read the same
// data then run together. Each task's result must not depend on the order.
void run_parallel_longest_first(int64_t num_tasks, const std::function<int64_t(int64_t)>& cost,
                                const std::function<void(const NextTask&)>& worker,
                                const std::function<int64_t(int64_t)>& section = nullptr);

}  // namespace sparse_attention::cpu
