#include "parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace sparse_attention::cpu {

void run_parallel(int64_t num_tasks, const std::function<void(const NextTask&)>& worker) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> counter{0};
  const NextTask next = [&counter, num_tasks]() -> int64_t {
    const int64_t task = counter.fetch_add(1, std::memory_order_relaxed);
    return task < num_tasks ? task : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

}  // namespace sparse_attention::cpu
