#include "parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

namespace sparse_attention::cpu {
namespace {

// Runs worker(next) on the pool, with next() mapping a shared counter through task_at.
template <typename TaskAt>
void run_counted(int64_t num_tasks, const TaskAt& task_at,
                 const std::function<void(const NextTask&)>& worker) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> counter{0};
  const NextTask next = [&counter, &task_at, num_tasks]() -> int64_t {
    const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
    return i < num_tasks ? task_at(i) : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

}  // namespace

void run_parallel(int64_t num_tasks, const std::function<void(const NextTask&)>& worker) {
  run_counted(num_tasks, [](int64_t i) { return i; }, worker);
}

void run_parallel_longest_first(int64_t num_tasks, const std::function<int64_t(int64_t)>& cost,
                                const std::function<void(const NextTask&)>& worker,
                                const std::function<int64_t(int64_t)>& section) {
  if (num_tasks <= 0) return;
  std::vector<int64_t> costs(num_tasks), sections(num_tasks, 0), order(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) {
    costs[t] = cost(t);
    if (section) sections[t] = section(t);
  }
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return sections[a] != sections[b] ? sections[a] < sections[b] : costs[a] > costs[b];
  });
  run_counted(num_tasks, [&order](int64_t i) { return order[i]; }, worker);
}

}  // namespace sparse_attention::cpu
