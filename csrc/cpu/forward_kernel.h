// Block-sparse attention forward on the CPU, FlashAttention-2 style: one task per
// (sequence, head, query block) walks its row of the layout with an online softmax, keeping
// the output accumulator in the accumulation type and writing out and lse once. With kPairs
// (bfloat16 inputs where the processor multiplies them natively) the two tile products run on
// bfloat16 pairs (pair_products.h), P rounded to bfloat16 as the second one reads it.
// Score terms (score_terms_tile.h) edit each tile before the element mask; dropout scales P
// after the row statistics took it, and a sink joins the denominator at the end. Rows of calls
// with few queries are walked in pieces and merged (row_pieces).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "attention_tile.h"
#include "pair_products.h"
#include "parallel.h"
#include "score_terms_tile.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

// Decode steps and short query blocks (speculative verification) make few row tasks, too few
// to keep a many-core CPU busy: the rows of calls of at most kSplitQueries queries are cut into
// up to kMaxRowPieces pieces of about kSplitKeys keys each, walked as tasks of their own and
// merged by their softmax statistics after. The cut depends on the lists alone, never on the
// thread count or the batch, so neither changes a result; it is skipped (for every row) when
// the pieces' partial sums would pass kMaxSplitBytes.
constexpr int64_t kSplitQueries = 64, kSplitKeys = 1024, kMaxRowPieces = 16;
constexpr int64_t kMaxSplitBytes = int64_t{256} << 20;

// Query heads walked together by one task (and so K and V read once for all of them): a
// GQA group's, when its rows are few (at most kPackedQueries in all, within one query block),
// its heads share their block lists and no score term differs by head; else 1. The task of a
// group's first head does the work; the others' are empty.
inline int64_t packed_heads(const Problem& p, const ScoreTerms& terms) {
  const int64_t group = p.group();
  const bool packs = group > 1 && !terms.any() && p.kv_heads % p.layout_heads == 0 &&
                     p.q_len * group <= std::min(kPackedQueries, p.block_size);
  return packs ? group : 1;
}

inline bool leads_pack(const Problem& p, int64_t task, int64_t pack) {
  return task / p.total_q_blocks() % pack == 0;
}

// Pieces of the row tasks: piece r walks entries parts[r] of task task[r]'s list; the pieces of
// task t are first[t] .. first[t + 1] - 1.
struct RowPieces {
  std::vector<int64_t> task, first;
  std::vector<Span> parts;
  bool split(int64_t t) const { return first[t + 1] - first[t] > 1; }
};

inline RowPieces row_pieces(const Problem& p, const BlockLists& rows, int64_t partial_bytes_per_query,
                            int64_t pack) {
  const int64_t tasks = num_row_tasks(p);
  std::vector<int64_t> counts(tasks, 1), lengths(tasks, 0);
  if (p.q_len <= kSplitQueries) {
    const int64_t blocks_per_piece = std::max<int64_t>(1, kSplitKeys / p.block_size);
    int64_t bytes = 0;
    for (int64_t t = 0; t < tasks; ++t) {
      if (!leads_pack(p, t, pack)) continue;
      lengths[t] = list_length(rows, row_task(p, t).list(p));
      counts[t] = std::clamp<int64_t>((lengths[t] + blocks_per_piece - 1) / blocks_per_piece, 1, kMaxRowPieces);
      if (counts[t] > 1) bytes += counts[t] * pack * std::min(p.q_len, p.block_size) * partial_bytes_per_query;
    }
    if (bytes > kMaxSplitBytes) std::fill(counts.begin(), counts.end(), 1);
  }
  RowPieces pieces;
  pieces.first.push_back(0);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = lengths[t], count = counts[t];
    for (int64_t r = 0; r < count; ++r) {
      pieces.task.push_back(t);
      pieces.parts.push_back(count == 1 ? Span{0, -1} : Span{r * n / count, (r + 1) * n / count});
    }
    pieces.first.push_back(static_cast<int64_t>(pieces.task.size()));
  }
  return pieces;
}

// The online softmax's state of one piece of a row task: per query the running maximum m and
// sum l, and the accumulated output acc [qn x D].
template <typename T>
struct RowState {
  std::vector<T> acc, m, l;
  RowState(int64_t bs, int64_t dim) : acc(bs * dim), m(bs), l(bs) {}
  void reset() {
    std::fill(acc.begin(), acc.end(), T(0));
    std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
    std::fill(l.begin(), l.end(), T(0));
  }
};

template <typename scalar_t, bool kPairs = false>
void forward_kernel(const ForwardParams& f) {
  using T = at::opmath_type<scalar_t>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Problem& p = f.problem;
  const int64_t bs = p.block_size, dim = p.head_dim;
  auto* out = static_cast<scalar_t*>(f.out);
  auto* lse = static_cast<T*>(f.lse);

  const int64_t pack = packed_heads(p, f.terms);

  // Writes out and lse of the rows of head row.head + h (rows h * qn ... of the state).
  const auto finish_head = [&](const RowTask& row, int64_t q0, int64_t qn, int64_t h,
                               const RowState<T>& state, const TileTerms<T>& terms) {
    const int64_t row0 = p.q_row(row.seq, row.head + h, q0);
    const T* acc = state.acc.data() + h * qn * dim;
    const T* m = state.m.data() + h * qn;
    const T* l = state.l.data() + h * qn;
    for (int64_t i = 0; i < qn; ++i) {
      // A row that saw no key returns 0 with lse = -inf (the sink's logit with a sink); a NaN
      // sum (NaN inputs) is not "no key": that row returns NaN.
      const bool seen = !(l[i] == T(0));
      T mul = seen ? T(1) / l[i] : T(0);
      if (!f.terms.sinks) {
        lse[row0 + i] = seen ? m[i] + std::log(l[i]) : kNegInf;
      } else if (!seen) {
        lse[row0 + i] = terms.sink;
      } else {  // lse = log(l e^m + e^sink), shifted by the larger of m and the sink
        const T top = std::max(m[i], terms.sink);
        lse[row0 + i] = top + std::log(l[i] * std::exp(m[i] - top) + std::exp(terms.sink - top));
        mul = std::exp(m[i] - lse[row0 + i]);
      }
      store_rows(1, dim, acc + i * dim, mul, out + (row0 + i) * dim, dim);
    }
  };
  // Writes out and lse of row task `task` from its state (acc, m, l over the whole row), for
  // each head of its pack.
  const auto finish = [&](int64_t task, const RowState<T>& state, const TileTerms<T>& terms) {
    const RowTask row = row_task(p, task);
    const int64_t q0 = row.qb * bs, qn = std::min(bs, row.seq.q_len - q0);
    for (int64_t h = 0; h < pack; ++h) finish_head(row, q0, qn, h, state, terms);
  };

  const RowPieces pieces = row_pieces(p, f.rows, (dim + 2) * static_cast<int64_t>(sizeof(T)), pack);
  const int64_t num_pieces = static_cast<int64_t>(pieces.task.size());
  // The states of the pieces of split rows, until they are merged.
  std::vector<std::unique_ptr<RowState<T>>> partial(num_pieces);
  const auto cost = [&](int64_t r) {
    const Span part = pieces.parts[r];
    if (!leads_pack(p, pieces.task[r], pack)) return int64_t{0};
    return pack * (part.p1 < 0 ? row_task_cost(p, f.rows, pieces.task[r]) : 1 + part.p1 - part.p0);
  };
  const auto section = [&](int64_t r) { return row_task_section(p, pieces.task[r], sizeof(scalar_t)); };
  run_parallel_longest_first(num_pieces, cost, [&](const NextTask& next) {
    // s_t is a column tile [kn x qn] (see attention_tile.h); m, l, shift, correction and
    // block_sum are per query.
    ColumnScorer<T, kPairs> scorer(bs, dim);
    std::vector<T> v_rows(bs * dim), s_t(bs * bs), new_max(bs), shift(bs), block_sum(bs), correction(bs);
    std::vector<Pair> v_pairs(kPairs ? pairs_of(bs) * dim : 0), p_pairs(kPairs ? pairs_of(bs) * bs : 0);
    TileTerms<T> terms(f.terms, p);
    RowState<T> whole(bs, dim);
    for (int64_t piece = next(); piece >= 0; piece = next()) {
      const int64_t task = pieces.task[piece];
      if (!leads_pack(p, task, pack)) continue;  // its pack's first head's task walks it
      const RowTask row = row_task(p, task);
      const Sequence& seq = row.seq;
      const int64_t batch = seq.batch, head = row.head, qb = row.qb;
      const int64_t kv_head = head / p.group(), q0 = qb * bs, qn = std::min(bs, seq.q_len - q0);
      const int64_t nq = pack * qn;  // the tile's columns: the queries of each head of the pack
      scorer.load_queries(p, qn, operand_rows<scalar_t>(f.q, batch, head, seq.q_begin + q0), f.q.row_stride,
                          pack, f.q.head_stride);
      if (pieces.split(task)) partial[piece] = std::make_unique<RowState<T>>(bs, dim);
      RowState<T>& state = pieces.split(task) ? *partial[piece] : whole;
      state.reset();
      T* acc = state.acc.data();
      T* m = state.m.data();
      T* l = state.l.data();
      terms.set_head(batch, head);

      for_each_block_pair<true>(p, f.rows, row.list(p), seq, qb, [&](const BlockPair& blk) {
        const int64_t kn = blk.kn;
        const T* bias = terms.template distance_bias<true>(seq, q0, qn, blk.k0, kn);
        const auto edit = [&](T* s, int64_t ld) { terms.edit_scores(kn, qn, bias, s, ld, nullptr); };
        scorer.scores(p, seq, blk, operand_rows<scalar_t>(f.k, batch, kv_head, seq.k_begin + blk.k0),
                      f.k.row_stride, s_t.data(), edit);
        const scalar_t* v_src = operand_rows<scalar_t>(f.v, batch, kv_head, seq.k_begin + blk.k0);
        // Online softmax, vectorised across queries: new running maximum, P^T = exp(S^T - max)
        // (a query that has seen nothing yet shifts by 0 and gets exp(-inf) = 0), and the
        // rescaling of what was accumulated under the old maximum.
        column_max(s_t.data(), kn, nq, m, new_max.data());
        for (int64_t i = 0; i < nq; ++i) shift[i] = new_max[i] == kNegInf ? T(0) : new_max[i];
        exp_shift_columns(s_t.data(), kn, nq, shift.data(), block_sum.data());
        online_softmax_step(m, new_max.data(), l, block_sum.data(), correction.data(), nq);
        for (int64_t i = 0; i < nq; ++i) {
          if (correction[i] != T(1)) scale_row(acc + i * dim, dim, correction[i]);
        }
        if (f.terms.dropout()) {  // the sums above took P whole
          terms.template dropout<true>(seq.q_begin + q0, qn, seq.k_begin + blk.k0, kn, s_t.data(), qn);
        }
        // O += P V, with P read from its transposed tile. A masked tile whose V holds inf or NaN
        // takes its products pair by pair, with V in the accumulation type.
        const bool pairs = kPairs && !scorer.few_queries && !has_subnormal(kn, dim, v_src, f.v.row_stride);
        const RowsView<T> v = pairs && !blk.masked ? RowsView<T>{nullptr, 0}
                                                   : rows_as(v_src, f.v.row_stride, kn, dim, v_rows.data());
        if (blk.masked && !all_finite(v.data, v.ld, kn, dim)) {
          add_visible_products(nq, kn, dim, s_t.data(), v.data, v.ld, acc);
        } else if (scorer.few_queries) {
          add_products_few_rows(nq, dim, kn, s_t.data(), nq, v.data, v.ld, acc, dim);
        } else if (!pairs) {
          gemm<true, true>(qn, dim, kn, s_t.data(), qn, v.data, v.ld, acc, dim,
                           SeenColumns<false>{seq, blk});
        } else if constexpr (kPairs) {
          pack_row_pairs(kn, dim, v_src, f.v.row_stride, v_pairs.data());
          pack_row_pairs(kn, qn, s_t.data(), qn, p_pairs.data());
          gemm_pairs<true, true>(qn, dim, pairs_of(kn), p_pairs.data(), qn, v_pairs.data(), dim, acc, dim);
        }
      }, pieces.parts[piece]);
      if (!pieces.split(task)) finish(task, state, terms);
    }
  }, section);

  // Split rows: the pieces' states merged in piece order, as one walk of the row would have
  // left them (up to rounding), then finished.
  std::vector<int64_t> split_tasks;
  for (int64_t t = 0; t < num_row_tasks(p); ++t) {
    if (pieces.split(t)) split_tasks.push_back(t);
  }
  run_parallel(static_cast<int64_t>(split_tasks.size()), [&](const NextTask& next) {
    TileTerms<T> terms(f.terms, p);
    RowState<T> merged(bs, dim);
    for (int64_t k = next(); k >= 0; k = next()) {
      const int64_t task = split_tasks[k];
      const RowTask row = row_task(p, task);
      const int64_t nq = pack * std::min(bs, row.seq.q_len - row.qb * bs);
      terms.set_head(row.seq.batch, row.head);
      merged.reset();
      for (int64_t r = pieces.first[task]; r < pieces.first[task + 1]; ++r) {
        const RowState<T>& part = *partial[r];
        for (int64_t i = 0; i < nq; ++i) {
          const T top = std::max(merged.m[i], part.m[i]);
          if (top == kNegInf) continue;  // neither has seen a key yet
          const T keep = std::exp(merged.m[i] - top), add = std::exp(part.m[i] - top);
          merged.l[i] = merged.l[i] * keep + part.l[i] * add;
          T* a = merged.acc.data() + i * dim;
          const T* b = part.acc.data() + i * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] = a[d] * keep + b[d] * add;
          merged.m[i] = top;
        }
        partial[r].reset();
      }
      finish(task, merged, terms);
    }
  });
}


}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
