// A CPU model of the Hopper kernels' pipelines (csrc/cuda/hopper/pipeline.h): the kernels' own
// produce/consume loops and list walks, run on threads (one producer, two consumer
// warpgroups) against modelled mbarriers, on random block lists: the forward's (a row list,
// K and V per key block, the product with V of each step overlapped with the next step's
// scores) and the backward's (the column lists of a kv head's group, Q and dO per 64-row
// query tile). Checks that every walk ends
// (a hang is reported after a time-out), that each consumer reads every stage only after the
// producer filled it and the producer refills it only after every consumer released it, and
// that the tile counts match a plain count of the lists. Run by tests/test_hopper_pipeline.py.
//
//   hopper_pipeline_model [cases] [seed]      exit 0 when every check passed
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/hopper/pipeline.h"

namespace sa = sparse_attention;
namespace cuda = sparse_attention::cuda;
namespace hopper = sparse_attention::cuda::hopper;

namespace {

constexpr int kBlock = 128;
constexpr int kStages = 2;
constexpr int kConsumers = 2;
constexpr int kQueryTile = 64;  // the backward's query rows per step
using RowWalk = hopper::RowTileWalk<kBlock>;
using ColumnWalk = hopper::ColumnTileWalk<kBlock, kQueryTile>;

int failures = 0;
bool quiet = false;  // the self-test's expected failures
void fail(const std::string& what) {
  if (++failures <= 20 && !quiet) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// An mbarrier: a phase completes when its expected arrivals have arrived; wait(parity) passes
// while the current phase's parity differs from `parity` (the hardware keeps no more than that).
struct Barrier {
  int expected = 0, pending = 0;
  uint32_t completed = 0;
};

// What one stage's buffer holds: the producer's fill number, and how many consumers have
// released that fill.
struct Slot {
  long fill = -1;
  int released = kConsumers;
};

class ModelSync {
 public:
  explicit ModelSync(std::chrono::milliseconds timeout) : timeout_(timeout) {
    for (auto& channel : full_) for (auto& b : channel) b.expected = b.pending = 1;
    for (auto& channel : empty_) for (auto& b : channel) b.expected = b.pending = kConsumers;
  }
  bool hung() const { return hung_; }

  void wait_empty(int channel, int stage, uint32_t parity) { wait(empty_[channel][stage], parity); }
  void wait_full(int channel, int stage, uint32_t parity) { wait(full_[channel][stage], parity); }
  void release(int channel, int stage) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++slots_[channel][stage].released;
    arrive(empty_[channel][stage]);
  }
  // The producer's copy: in flight until land() lands it, in any order with the others (TMA
  // copies complete out of order), which completes the stage's full barrier.
  void fill(int channel, int stage, long number) {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& slot = slots_[channel][stage];
    if (!hung_ && slot.released != kConsumers) fail("a stage was refilled before every consumer released it");
    slot.released = 0;
    in_flight_.push_back({channel, stage, number});
  }
  // Lands one copy in flight, picked by `pick`; false when none is.
  template <typename Pick>
  bool land(Pick& pick) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (in_flight_.empty()) return false;
    const size_t i = pick() % in_flight_.size();
    const Copy copy = in_flight_[i];
    in_flight_.erase(in_flight_.begin() + static_cast<long>(i));
    slots_[copy.channel][copy.stage].fill = copy.number;
    arrive(full_[copy.channel][copy.stage]);
    return true;
  }
  long read(int channel, int stage) {
    std::lock_guard<std::mutex> lock(mutex_);
    return slots_[channel][stage].fill;
  }

 private:
  void arrive(Barrier& b) {
    if (--b.pending == 0) {
      ++b.completed;
      b.pending = b.expected;
      changed_.notify_all();
    }
  }
  void wait(Barrier& b, uint32_t parity) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!changed_.wait_for(lock, timeout_, [&] { return hung_ || (b.completed & 1) != parity; })) {
      hung_ = true;  // from here on every wait passes, so the threads finish and report
      changed_.notify_all();
    }
  }

  struct Copy {
    int channel, stage;
    long number;
  };
  std::vector<Copy> in_flight_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable changed_;
  Barrier full_[2][kStages], empty_[2][kStages];
  Slot slots_[2][kStages];
  bool hung_ = false;
};

// Named barriers between the two consumer warpgroups (each thread here stands for one): a
// barrier completes when both have arrived or synced on it; sync waits for that.
class ModelNamedBarriers {
 public:
  explicit ModelNamedBarriers(std::chrono::milliseconds timeout) : timeout_(timeout) {}
  void arrive(uint32_t id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    add(id);
  }
  void sync(uint32_t id) const {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = barriers_.at(id).generation;
    add(id);
    if (!changed_.wait_for(lock, timeout_, [&] { return hung_ || barriers_[id].generation != generation; })) {
      hung_ = true;
      changed_.notify_all();
    }
  }
  bool hung() const { return hung_; }
  // Every barrier as it started: no arrival left waiting for its partner.
  bool balanced() const {
    for (const auto& b : barriers_) if (b.count) return false;
    return true;
  }

 private:
  struct Barrier {
    int count = 0;
    long generation = 0;
  };
  void add(uint32_t id) const {
    Barrier& b = barriers_.at(id);
    if (++b.count == kConsumers) {
      b.count = 0;
      ++b.generation;
      changed_.notify_all();
    }
  }
  std::chrono::milliseconds timeout_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  mutable std::array<Barrier, 16> barriers_;
  mutable bool hung_ = false;
};

// Runs one thread block's roles over the lists of block `fixed` (a query block for row walks, a
// key block for column walks, with `head` a query or kv head); consumer_fixed lets the
// self-test give consumers another list. Returns whether it hung.
template <typename Walk, bool kOverlapped>
bool run_block(const cuda::Params& p, int s, int head, int fixed, int consumer_fixed, int expected_tiles,
               std::mt19937& rng, std::chrono::milliseconds timeout) {
  const sa::Sequence seq = cuda::sequence_of(p, s);
  ModelSync sync(timeout);
  ModelNamedBarriers named(timeout);
  const bool pingpong = rng() % 2;  // the forward with and without its warpgroups' turns
  const unsigned yield_seed = rng();
  std::thread producer([&] {
    std::minstd_rand jitter(yield_seed);
    Walk walk(p, seq, s, head, fixed);
    long number = 0;
    hopper::produce<kStages>(walk, sync, [&](int channel, int stage, const Walk&) {
      if (jitter() % 3 == 0) std::this_thread::yield();
      sync.fill(channel, stage, channel == hopper::kKeys ? number : number++);
    });
    if (!sync.hung() && number != expected_tiles) fail("producer walked another number of tiles");
  });
  // The copy engine: lands the producer's copies at random moments, in random order, while
  // a consumer may wait for one.
  std::atomic<int> running(kConsumers);
  std::thread copies([&] {
    std::minstd_rand pick(yield_seed + 100);
    while (running.load() > 0 || sync.land(pick)) {
      if (!sync.land(pick) || pick() % 2 == 0) std::this_thread::yield();
    }
  });
  std::vector<std::thread> consumers;
  for (int c = 0; c < kConsumers; ++c) {
    consumers.emplace_back([&, c] {
      std::minstd_rand jitter(yield_seed + 1 + c);
      Walk walk(p, seq, s, head, consumer_fixed);
      long number = 0;
      // The stage must hold the tile of step `step` (the producer numbers its fills by step).
      auto check = [&](int channel, int stage, long step) {
        if (jitter() % 3 == 0) std::this_thread::yield();
        if (!sync.hung() && sync.read(channel, stage) != step) fail("a consumer read a stage another tile filled");
      };
      if constexpr (kOverlapped) {  // the forward: V of step j - 1 is read while step j starts
        const hopper::PingPong<ModelNamedBarriers> turns{named, pingpong, c};
        hopper::consume_overlapped<kStages>(
            walk, sync,
            [&](int stage, int previous, const Walk&) {
              turns.wait_turn(previous < 0);
              if (previous >= 0) check(hopper::kValues, previous, number - 1);
              check(hopper::kKeys, stage, number++);
              turns.hand_over();
            },
            [](const Walk&) {}, [] {},
            [&](int stage) {
              turns.finish();
              check(hopper::kValues, stage, number - 1);
            });
      } else {
        hopper::consume<kStages>(
            walk, sync, [&](int stage, const Walk&) { check(hopper::kKeys, stage, number); },
            [&](int stage, const Walk&) {  // the backward reads Q here too (dK += dS^T Q)
              check(hopper::kValues, stage, number);
              check(hopper::kKeys, stage, number++);
            });
      }
      if (!sync.hung() && number != expected_tiles) fail("a consumer walked another number of tiles");
      --running;
    });
  }
  producer.join();
  copies.join();
  for (auto& t : consumers) t.join();
  if (!sync.hung() && !named.hung() && !named.balanced()) fail("the warpgroups' turns left a barrier unbalanced");
  return sync.hung() || named.hung();
}

bool all_padded(const cuda::Params& p, const sa::Sequence& seq, int kb) {
  return p.key_block_state &&
         p.key_block_state[seq.batch * p.k_blocks + kb] == static_cast<uint8_t>(sa::KeyBlockState::kAllPadded);
}

// Entries [begin, end) of list `list`, clamped as the kernels clamp them.
void entries(const cuda::DeviceLists& l, int list, int* begin, int* end) {
  *begin = std::min(std::max(l.offsets[list], 0), l.nnz);
  *end = std::min(std::max(l.offsets[list + 1], *begin), l.nnz);
}

// The tiles of a row list, counted plainly from the rules the walk implements.
int count_row_tiles(const cuda::Params& p, const sa::Sequence& seq, int s, int head, int qb) {
  int begin, end, tiles = 0;
  entries(p.rows, static_cast<int>(sa::list_index(p.list_batch, p.layout_heads, p.heads, s, head, qb, p.q_blocks)),
          &begin, &end);
  for (int e = begin; e < end; ++e) {
    const int kb = p.rows.indices[e];
    if (kb < 0 || kb >= p.k_blocks || int64_t{kb} * kBlock >= seq.k_len) continue;
    if (!all_padded(p, seq, kb)) ++tiles;
  }
  return tiles;
}

// The query tiles of a key block's column lists over the kv head's group, counted plainly.
int count_column_tiles(const cuda::Params& p, const sa::Sequence& seq, int s, int kv_head, int kb) {
  if (all_padded(p, seq, kb)) return 0;
  const int group = p.heads / p.kv_heads;
  int tiles = 0;
  for (int h = kv_head * group; h < (kv_head + 1) * group; ++h) {
    int begin, end;
    entries(p.cols, static_cast<int>(sa::list_index(p.list_batch, p.layout_heads, p.heads, s, h, kb, p.k_blocks)),
            &begin, &end);
    for (int e = begin; e < end; ++e) {
      const int qb = p.cols.indices[e];
      if (qb < 0 || qb >= p.q_blocks) continue;
      for (int t = 0; t < kBlock / kQueryTile; ++t) tiles += int64_t{qb} * kBlock + t * kQueryTile < seq.q_len;
    }
  }
  return tiles;
}

struct Case {
  cuda::Params p;
  std::vector<int32_t> offsets, indices, col_offsets, col_indices;
  std::vector<uint8_t> states;
  std::vector<int64_t> q_starts, k_starts;
};

Case random_case(std::mt19937& rng) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Case c;
  cuda::Params& p = c.p;
  p.block_size = kBlock;
  p.kv_heads = pick(1, 2);
  p.heads = p.kv_heads * pick(1, 2);
  const int layout = pick(0, 2);
  p.layout_heads = layout == 0 ? 1 : layout == 1 ? p.kv_heads : p.heads;
  const bool packed = pick(0, 3) == 0;
  p.batch = packed ? 1 : pick(1, 2);
  p.list_batch = pick(0, 1) ? p.batch : 1;
  p.q_len = pick(1, 1100);
  p.k_len = pick(0, 3) == 0 ? p.q_len : pick(1, 1100);
  p.q_blocks = (p.q_len + kBlock - 1) / kBlock;
  p.k_blocks = (p.k_len + kBlock - 1) / kBlock;
  const int w = pick(0, 2);
  p.window = w == 0 ? sa::Window{} : w == 1 ? sa::Window{-1, 0, p.k_len - p.q_len}
                                            : sa::Window{pick(0, 300), pick(0, 300), p.k_len - p.q_len};
  p.sequences = p.batch;
  if (packed) {  // documents of random lengths, each with its own keys
    const int documents = pick(1, 4);
    c.q_starts = {0};
    c.k_starts = {0};
    for (int d = 1; d < documents; ++d) {
      c.q_starts.push_back(std::min<int64_t>(c.q_starts.back() + pick(0, p.q_len), p.q_len));
      c.k_starts.push_back(std::min<int64_t>(c.k_starts.back() + pick(0, p.k_len), p.k_len));
    }
    c.q_starts.push_back(p.q_len);
    c.k_starts.push_back(p.k_len);
    p.sequences = documents;
    p.q_starts = c.q_starts.data();
    p.k_starts = c.k_starts.data();
  }
  // Lists: random blocks (full counts are irrelevant to the walk), now and then an index
  // outside the grid, an empty list or offsets out of order, which the walks must survive.
  auto random_lists = [&](int blocks, int across, std::vector<int32_t>& offsets, std::vector<int32_t>& indices) {
    const int lists = p.list_batch * p.layout_heads * blocks;
    offsets.push_back(0);
    for (int l = 0; l < lists; ++l) {
      const int n = pick(0, 5) == 0 ? 0 : pick(1, across + 1);
      for (int i = 0; i < n; ++i) {
        const int junk = pick(0, 19);
        indices.push_back(junk == 0 ? -1 : junk == 1 ? across + pick(0, 3) : pick(0, across - 1));
      }
      offsets.push_back(static_cast<int32_t>(indices.size()));
    }
    if (pick(0, 9) == 0 && lists > 1) std::swap(offsets[1], offsets[lists - 1]);
    return cuda::DeviceLists{offsets.data(), indices.data(), static_cast<int32_t>(indices.size())};
  };
  p.rows = random_lists(p.q_blocks, p.k_blocks, c.offsets, c.indices);
  p.cols = random_lists(p.k_blocks, p.q_blocks, c.col_offsets, c.col_indices);
  if (pick(0, 2) == 0) {
    c.states.resize(static_cast<size_t>(p.batch) * p.k_blocks);
    for (auto& st : c.states) st = static_cast<uint8_t>(pick(0, 2));
    p.key_block_state = c.states.data();
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 200;
  std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 1);
  const auto timeout = std::chrono::milliseconds(5000);
  long blocks = 0, tiles = 0;
  for (int i = 0; i < cases && failures == 0; ++i) {
    Case c = random_case(rng);
    const cuda::Params& p = c.p;
    for (int s = 0; s < p.sequences; ++s) {
      const sa::Sequence seq = cuda::sequence_of(p, s);
      for (int head = 0; head < p.heads; ++head) {  // the forward's thread blocks
        for (int qb = 0; qb < p.q_blocks && int64_t{qb} * kBlock < seq.q_len; ++qb) {
          const int expected = count_row_tiles(p, seq, s, head, qb);
          if (run_block<RowWalk, true>(p, s, head, qb, qb, expected, rng, timeout)) {
            fail("the forward's pipeline hung");
          }
          ++blocks;
          tiles += expected;
        }
      }
      for (int kv_head = 0; kv_head < p.kv_heads; ++kv_head) {  // the backward's
        for (int kb = 0; kb < p.k_blocks && int64_t{kb} * kBlock < seq.k_len; ++kb) {
          const int expected = count_column_tiles(p, seq, s, kv_head, kb);
          if (run_block<ColumnWalk, false>(p, s, kv_head, kb, kb, expected, rng, timeout)) {
            fail("the backward's pipeline hung");
          }
          ++blocks;
          tiles += expected;
        }
      }
    }
  }
  // Self-test: consumers walking a shorter list than the producer's must be caught as a hang
  // (the producer waits for stages nobody releases).
  {
    Case c = random_case(rng);
    cuda::Params& p = c.p;
    p.sequences = p.batch = p.list_batch = 1;
    p.q_starts = p.k_starts = nullptr;
    p.key_block_state = nullptr;
    p.q_len = p.k_len = 8 * kBlock;
    p.q_blocks = p.k_blocks = 8;
    p.window = sa::Window{};
    p.layout_heads = p.heads = p.kv_heads = 1;
    c.offsets = {0, 8, 8};
    c.indices = {0, 1, 2, 3, 4, 5, 6, 7};
    p.q_blocks = 2;
    p.rows = cuda::DeviceLists{c.offsets.data(), c.indices.data(), 8};
    const int saved = failures;
    quiet = true;
    const bool hung =
        run_block<RowWalk, true>(p, 0, 0, 0, 1, 8, rng, std::chrono::milliseconds(300));
    failures = saved;  // the count mismatches it reports are expected
    quiet = false;
    if (!hung) fail("self-test: a producer/consumer disagreement was not detected as a hang");
  }
  std::printf("%ld thread blocks, %ld tiles: %s\n", blocks, tiles, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
