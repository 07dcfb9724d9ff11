// Per-block steps shared by the forward and backward kernels: the element rules on a score
// tile and the description of one (query block, key block) pair.
//
// Score tiles come in two orientations. "Row" tiles s[qn x kn] hold one row per query (the
// dK/dV pass walks query blocks against a fixed key block). "Column" tiles s_t[kn x qn] hold
// one row per key and one column per query: a task that owns a query block keeps Q^T once and
// multiplies key rows straight from memory, so no key tile is ever transposed, and softmax
// statistics run vectorised across queries.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "pair_products.h"
#include "params.h"
#include "tile_ops.h"

namespace sparse_attention::cpu {
inline namespace CPU_CAPABILITY {

// Rows and columns of one block pair, clipped to the sequence ends.
struct BlockPair {
  int64_t q0, qn, k0, kn;
  bool masked;  // element rules must be applied (partial block or mixed padding)
};

// Whether window w shows every element of blk (classify_block's test for whole blocks, on the
// clipped block: the CUDA kernels keep their own copy, whose register allocation was
// validated on a GPU).
inline bool window_covers(const BlockPair& blk, const Window& w) {
  const int64_t d_min = blk.k0 - (blk.q0 + blk.qn - 1) - w.offset;
  const int64_t d_max = blk.k0 + blk.kn - 1 - blk.q0 - w.offset;
  return (w.right < 0 || d_max <= w.right) && (w.left < 0 || d_min >= -w.left);
}

// Columns [lo, hi) of stored row r of a tile of blk that the window shows: along each stored
// row (a query of a row tile, a key of a column tile: kColumns) Window::visible holds on one
// interval, and lo and hi never decrease from one row to the next.
template <bool kColumns>
inline Span window_columns(const Sequence& seq, const BlockPair& blk, int64_t r) {
  const Window& w = seq.window;
  const int64_t cols = kColumns ? blk.qn : blk.kn;
  // Column `base` is where key - query = offset; the window spans [base - below, base + above].
  const int64_t base = kColumns ? blk.k0 + r - blk.q0 - w.offset : blk.q0 + r + w.offset - blk.k0;
  const int64_t below = kColumns ? w.right : w.left, above = kColumns ? w.left : w.right;
  const int64_t lo = std::clamp<int64_t>(below < 0 ? 0 : base - below, 0, cols);
  return {lo, std::clamp<int64_t>(above < 0 ? cols : base + above + 1, lo, cols)};
}

// Sets to -inf the scores the element rules hide: s is [qn x kn] (kColumns false) or
// [kn x qn] (kColumns true), with leading dimension ld. Key padding hides whole keys.
template <bool kColumns, typename T>
inline void apply_element_mask(const Problem& p, const Sequence& seq, const BlockPair& blk, T* s,
                               int64_t ld) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t rows = kColumns ? blk.kn : blk.qn, cols = kColumns ? blk.qn : blk.kn;
  for (int64_t r = 0; r < rows; ++r) {
    const Span shown = window_columns<kColumns>(seq, blk, r);
    T* row = s + r * ld;
    std::fill(row, row + shown.p0, kNegInf);
    std::fill(row + shown.p1, row + cols, kNegInf);
  }
  if (!p.key_padding) return;
  const uint8_t* pad = p.key_padding + seq.batch * p.k_len + seq.k_begin + blk.k0;
  for (int64_t j = 0; j < blk.kn; ++j) {
    if (!pad[j]) continue;
    if (kColumns) {
      std::fill(s + j * ld, s + j * ld + blk.qn, kNegInf);
    } else {
      for (int64_t i = 0; i < blk.qn; ++i) s[i * ld + j] = kNegInf;
    }
  }
}

// Extents (tile_ops.h) that leave out what the window hides (in a partial block; a full one
// shows everything), for products whose rows of C are the stored rows of a kColumns tile
// (keys) or of a row tile (queries). The columns those rows see, together:
template <bool kColumns>
inline Span window_span(const Sequence& seq, const BlockPair& blk, int64_t i0, int64_t i1) {
  return {window_columns<kColumns>(seq, blk, i0).p0, window_columns<kColumns>(seq, blk, i1 - 1).p1};
}

// Scores: a strip whose rows see none of the panel's columns is left out (the element mask
// then fills it with -inf).
template <bool kColumns>
struct HiddenScores {
  const Sequence& seq;
  const BlockPair& blk;
  int64_t k;
  Span operator()(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    const Span seen = window_span<kColumns>(seq, blk, i0, i1);
    return {0, j0 < seen.p1 && j1 > seen.p0 ? k : 0};
  }
};

// Products summed over a tile's columns (P or dS times a block of rows): only the columns the
// strip's rows see, P and dS being 0 at the others.
template <bool kColumns>
struct SeenColumns {
  const Sequence& seq;
  const BlockPair& blk;
  Span operator()(int64_t i0, int64_t i1, int64_t, int64_t) const {
    return window_span<kColumns>(seq, blk, i0, i1);
  }
};

// What runs on a score tile between the product and the element mask: the score terms
// (score_terms_tile.h) as edit(s, ld), or nothing.
struct NoEdit {
  template <typename T>
  void operator()(T*, int64_t) const {}
};

// Column tile S^T[kn x qn] = K (scale Q)^T from key rows and the task's (scale Q)^T [D x qn],
// edited, with the element rules applied.
template <typename T, typename Edit = NoEdit>
inline void column_scores(const Problem& p, const Sequence& seq, const BlockPair& blk,
                          const RowsView<T>& k, const T* q_t, T* s_t, const Edit& edit = {}) {
  gemm<false>(blk.kn, blk.qn, p.head_dim, k.data, k.ld, q_t, blk.qn, s_t, blk.qn,
              HiddenScores<true>{seq, blk, p.head_dim});
  edit(s_t, blk.qn);
  if (blk.masked) apply_element_mask<true>(p, seq, blk, s_t, blk.qn);
}

// Row tile S[qn x kn] = Q (scale K)^T from query rows and the task's (scale K)^T [D x kn],
// edited, with the element rules applied.
template <typename T, typename Edit = NoEdit>
inline void row_scores(const Problem& p, const Sequence& seq, const BlockPair& blk,
                       const RowsView<T>& q, const T* k_t, T* s, const Edit& edit = {}) {
  gemm<false>(blk.qn, blk.kn, p.head_dim, q.data, q.ld, k_t, blk.kn, s, blk.kn,
              HiddenScores<false>{seq, blk, p.head_dim});
  edit(s, blk.kn);
  if (blk.masked) apply_element_mask<false>(p, seq, blk, s, blk.kn);
}

// The same tiles from bfloat16 pairs (pair_products.h): S = scale (Q K^T), the scale applied
// in fp32 to the product of the unscaled operands, which both orientations round alike.
template <typename Edit = NoEdit>
inline void column_scores(const Problem& p, const Sequence& seq, const BlockPair& blk,
                          const Pair* k, const Pair* q_t, float* s_t, const Edit& edit = {}) {
  gemm_pairs<false>(blk.kn, blk.qn, pairs_of(p.head_dim), k, pairs_of(p.head_dim), q_t, blk.qn, s_t, blk.qn);
  scale_row(s_t, blk.kn * blk.qn, static_cast<float>(p.scale));
  edit(s_t, blk.qn);
  if (blk.masked) apply_element_mask<true>(p, seq, blk, s_t, blk.qn);
}

template <typename Edit = NoEdit>
inline void row_scores(const Problem& p, const Sequence& seq, const BlockPair& blk,
                       const Pair* q, const Pair* k_t, float* s, const Edit& edit = {}) {
  gemm_pairs<false>(blk.qn, blk.kn, pairs_of(p.head_dim), q, pairs_of(p.head_dim), k_t, blk.kn, s, blk.kn);
  scale_row(s, blk.qn * blk.kn, static_cast<float>(p.scale));
  edit(s, blk.kn);
  if (blk.masked) apply_element_mask<false>(p, seq, blk, s, blk.kn);
}

// Query blocks of at most kFewQueries queries (decode steps, speculative verification) take
// their products as dot products along D (gemm_dots, add_products_few_rows), in the
// accumulation type also where pairs would be used. So do the query blocks of several heads
// of a GQA group taken together (at most kPackedQueries rows in all; see packed_heads).
constexpr int64_t kFewQueries = 4, kPackedQueries = 16;

// Scratch and the task's query operand for column tiles, in either form of the products:
// (scale Q)^T [D x qn] in the accumulation type, or Q^T as pairs; for few queries the rows
// of scale Q [heads * qn x D] in the accumulation type, head by head.
template <typename T, bool kPairs>
struct ColumnScorer {
  std::vector<T> q_t, q_rows, k_rows;
  std::vector<Pair> q_pairs, k_pairs;
  bool few_queries = false;
  int64_t heads = 1;

  ColumnScorer(int64_t bs, int64_t dim)
      : q_t(kPairs ? 0 : dim * bs), q_rows(kPackedQueries * dim), k_rows(bs * dim),
        q_pairs(kPairs ? pairs_of(dim) * bs : 0), k_pairs(kPairs ? bs * pairs_of(dim) : 0) {}

  // qn query rows from q (row_stride apart), of `num_heads` heads (head_stride apart; more
  // than one only with at most kPackedQueries rows in all).
  template <typename scalar_t>
  void load_queries(const Problem& p, int64_t qn, const scalar_t* q, int64_t row_stride,
                    int64_t num_heads = 1, int64_t head_stride = 0) {
    heads = num_heads;
    few_queries = num_heads > 1 || qn <= kFewQueries;
    if (few_queries) {
      for (int64_t h = 0; h < num_heads; ++h) {
        load_rows(qn, p.head_dim, q + h * head_stride, row_stride, static_cast<T>(p.scale),
                  q_rows.data() + h * qn * p.head_dim);
      }
    } else if constexpr (kPairs) {
      pack_pairs_transposed(qn, p.head_dim, q, row_stride, q_pairs.data());
    } else {
      load_rows_transposed(qn, p.head_dim, q, row_stride, static_cast<T>(p.scale), q_t.data(), qn);
    }
  }

  // S^T [kn x qn] of block pair blk from its key rows in memory, edited before the mask.
  template <typename scalar_t, typename Edit = NoEdit>
  void scores(const Problem& p, const Sequence& seq, const BlockPair& blk, const scalar_t* k,
              int64_t stride, T* s_t, const Edit& edit = {}) {
    if (few_queries) {  // S^T [kn x heads * qn], the columns of each head after another's
      const RowsView<T> keys = rows_as(k, stride, blk.kn, p.head_dim, k_rows.data());
      const int64_t columns = heads * blk.qn;
      gemm_dots(blk.kn, columns, p.head_dim, keys.data, keys.ld, q_rows.data(), p.head_dim, s_t, columns);
      for (int64_t h = 0; h < heads; ++h) {
        edit(s_t + h * blk.qn, columns);
        if (blk.masked) apply_element_mask<true>(p, seq, blk, s_t + h * blk.qn, columns);
      }
    } else if constexpr (kPairs) {
      pack_pairs(blk.kn, p.head_dim, k, stride, k_pairs.data());
      column_scores(p, seq, blk, k_pairs.data(), q_pairs.data(), s_t, edit);
    } else {
      column_scores(p, seq, blk, rows_as(k, stride, blk.kn, p.head_dim, k_rows.data()), q_t.data(), s_t, edit);
    }
  }
};

// Whether rows [0, rows) of a tile with leading dimension ld hold only finite values: x * 0
// is 0 for a finite x and NaN for inf or NaN.
template <typename T>
inline bool all_finite(const T* x, int64_t ld, int64_t rows, int64_t dim) {
  using Vec = at::vec::Vectorized<T>;
  Vec sum(T(0));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < dim; j += Vec::size()) {
      sum = sum + Vec::loadu(x + i * ld + j, std::min<int64_t>(Vec::size(), dim - j)) * Vec(T(0));
    }
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, sum) == T(0);
}

// acc[qn x D] += P V over the nonzero entries of P only, P stored transposed as p_t[kn x qn].
// For masked tiles whose values hold inf or NaN: a key hidden from a query has P = 0, and the
// plain product's 0 * inf = NaN would leak that key into queries that never see it. Skipped
// terms add exactly 0 in the plain product, and the others go through the same fmadd in the
// same order, so queries that see only finite values get the plain product's result exactly.
template <typename T>
inline void add_visible_products(int64_t qn, int64_t kn, int64_t dim, const T* p_t, const T* v,
                                 int64_t ldv, T* acc) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < kn; ++j) {
    for (int64_t i = 0; i < qn; ++i) {
      const T w = p_t[j * qn + i];
      if (w == T(0)) continue;
      T* a = acc + i * dim;
      for (int64_t d = 0; d < dim; d += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), dim - d);
        at::vec::fmadd(Vec(w), Vec::loadu(v + j * ldv + d, n), Vec::loadu(a + d, n)).store(a + d, n);
      }
    }
  }
}

// The backward products of masked tiles that hold inf or NaN, pair by pair. As in
// add_visible_products, a pair hidden by the element rules (score -inf) is skipped rather than
// multiplied by P = 0, so 0 * NaN never reaches the gradients of a row or key that does not
// see the bad value; every other pair contributes what the plain products give it.

// Whether the saved statistics of rows [0, n) are usable by the plain products: lse finite or
// -inf (a row that sees no key) and delta finite.
template <typename T>
inline bool row_stats_finite(const T* lse, const T* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(lse[i]) || lse[i] == std::numeric_limits<T>::infinity() || !std::isfinite(delta[i])) {
      return false;
    }
  }
  return true;
}

// What the score terms (score_terms_tile.h) add to the backward of a row tile [qn x kn], each
// null when absent: the dropout scales z, d capped / d raw of the soft cap, and the running
// sums by diagonal (add_diagonal_sums) that the distance bias's gradient takes dS into.
template <typename T>
struct TileGradTerms {
  const T* keep = nullptr;
  const T* cap_grad = nullptr;
  T* diagonal_sums = nullptr;
};

// The backward on row tile s[qn x kn] = (scale Q) K^T pair by pair: grad_v += (P z)^T dO,
// grad_k += dS^T (scale Q) and grad_q += dS K (unscaled), dS = P (z dO V^T - delta) times the
// soft cap's derivative; v_t is V^T [D x kn], grad_q the block's rows [qn x D].
template <typename T>
inline void grad_visible(int64_t qn, int64_t kn, int64_t dim, const T* s, const T* lse,
                         const T* delta, const RowsView<T>& q, const RowsView<T>& d_o,
                         const RowsView<T>& k, const T* v_t, T* grad_q, T* grad_k, T* grad_v,
                         const TileGradTerms<T>& terms) {
  for (int64_t i = 0; i < qn; ++i) {
    if (std::isinf(lse[i])) continue;  // the row sees no key
    const T* q_i = q.data + i * q.ld;
    const T* do_i = d_o.data + i * d_o.ld;
    for (int64_t j = 0; j < kn; ++j) {
      const int64_t e = i * kn + j;
      if (s[e] == -std::numeric_limits<T>::infinity()) continue;
      const T prob = std::exp(s[e] - lse[i]), keep = terms.keep ? terms.keep[e] : T(1);
      T dp = 0;
      for (int64_t d = 0; d < dim; ++d) dp += do_i[d] * v_t[d * kn + j];
      T ds = prob * (keep * dp - delta[i]);
      if (terms.diagonal_sums) terms.diagonal_sums[j - i + qn - 1] += ds;
      if (terms.cap_grad) ds *= terms.cap_grad[e];
      const T* k_j = k.data + j * k.ld;
      for (int64_t d = 0; d < dim; ++d) {
        grad_v[j * dim + d] += prob * keep * do_i[d];
        grad_k[j * dim + d] += ds * q_i[d];
        grad_q[i * dim + d] += ds * k_j[d];
      }
    }
  }
}

// Key-block state of a batch entry under key padding (all valid when there is none).
inline KeyBlockState key_block_state(const Problem& p, int64_t batch, int64_t kb) {
  return p.key_block_state
             ? static_cast<KeyBlockState>(p.key_block_state[batch * p.k_blocks + kb])
             : KeyBlockState::kAllValid;
}

// Describes block pair (qb, kb) of a sequence, or returns false when padding hides the whole
// key block. Rows and columns are the sequence's own (operands add its *_begin).
inline bool make_block_pair(const Problem& p, const Sequence& seq, int64_t qb, int64_t kb,
                            bool listed_partial, BlockPair* blk) {
  const KeyBlockState state = key_block_state(p, seq.batch, kb);
  if (state == KeyBlockState::kAllPadded) return false;
  blk->q0 = qb * p.block_size;
  blk->qn = std::min(p.block_size, seq.q_len - blk->q0);
  blk->k0 = kb * p.block_size;
  blk->kn = std::min(p.block_size, seq.k_len - blk->k0);
  // A tail block is listed partial, but once clipped the window may show all of it (every
  // block of a decode step's row): then it needs no element mask.
  blk->masked = state == KeyBlockState::kMixed ||
                (listed_partial && !window_covers(*blk, seq.window));
  return true;
}

// Calls fn(const BlockPair&) for each entry of list `list` that padding leaves visible:
// entries are key blocks of query block `fixed` (kRows) or query blocks of key block `fixed`.
// `part`: only entries [part.p0, part.p1) of the list (p1 < 0: to its end).
template <bool kRows, typename Fn>
inline void for_each_block_pair(const Problem& p, const BlockLists& lists, int64_t list,
                                const Sequence& seq, int64_t fixed, const Fn& fn,
                                const Span& part = {0, -1}) {
  const int64_t begin = lists.offsets[list] + part.p0;
  const int64_t end = part.p1 < 0 ? lists.offsets[list + 1] : lists.offsets[list] + part.p1;
  const int64_t full_end = lists.offsets[list] + lists.num_full[list];
  for (int64_t e = begin; e < end; ++e) {
    const int64_t qb = kRows ? fixed : lists.indices[e], kb = kRows ? lists.indices[e] : fixed;
    BlockPair blk;
    if (make_block_pair(p, seq, qb, kb, e >= full_end, &blk)) fn(blk);
  }
}

// Entries of list `list`: the block pairs a task walks.
inline int64_t list_length(const BlockLists& lists, int64_t list) {
  return lists.offsets[list + 1] - lists.offsets[list];
}

// One query block of one (sequence, head): a task of the forward and of the dQ pass. Tasks
// are numbered head-major over the query blocks of all sequences.
struct RowTask {
  Sequence seq;
  int64_t s, head, qb;
  int64_t list(const Problem& p) const { return p.list(s, head, qb, p.q_blocks); }
};

inline int64_t num_row_tasks(const Problem& p) { return p.heads * p.total_q_blocks(); }

inline RowTask row_task(const Problem& p, int64_t task) {
  RowTask t;
  t.head = task / p.total_q_blocks();
  p.locate(task % p.total_q_blocks(), true, &t.s, &t.qb);
  t.seq = p.sequence(t.s);
  return t;
}

// What the tasks of one section read together, at most (one kv head's at least): about half
// the last-level cache of a desktop processor or of a server's core complex. Without
// sections the threads took every head's longest tasks first and cycled through all heads'
// data, which stopped fitting the cache at long lengths (the AVX2 fp32 forward ran 8% slower
// per block at N = 8192 than at 4096, D = 128, 8 heads; with sections 16% faster than that).
constexpr int64_t kSectionBytes = 8 << 20;

// The section (see run_parallel_longest_first) of a task on kv head `kv_head`: kv heads in
// groups whose data, `bytes_per_kv_head` each, fits in kSectionBytes.
inline int64_t kv_head_section(int64_t kv_head, int64_t bytes_per_kv_head) {
  return kv_head / std::max<int64_t>(1, kSectionBytes / std::max<int64_t>(bytes_per_kv_head, 1));
}

// A row task's section: it reads its kv head's K and V, of every sequence.
inline int64_t row_task_section(const Problem& p, int64_t task, int64_t element_bytes) {
  return kv_head_section(task / p.total_q_blocks() / p.group(), 2 * p.batch * p.k_len * p.head_dim * element_bytes);
}

// Work of a row task, for longest-first scheduling: its block pairs plus the fixed cost of
// loading and storing the query block.
inline int64_t row_task_cost(const Problem& p, const BlockLists& rows, int64_t task) {
  return 1 + list_length(rows, row_task(p, task).list(p));
}

// Block pairs in key block kb's column of one (sequence s, kv head) over the query heads of
// its GQA group, plus the fixed cost of loading and storing the key block.
inline int64_t column_cost(const Problem& p, const BlockLists& cols, int64_t s, int64_t kv_head,
                           int64_t kb) {
  int64_t cost = 1;
  for (int64_t head = kv_head * p.group(); head < (kv_head + 1) * p.group(); ++head) {
    cost += list_length(cols, p.list(s, head, kb, p.k_blocks));
  }
  return cost;
}

// Pointer to row `row` of head `head` of batch entry `batch` of an operand.
template <typename scalar_t>
inline const scalar_t* operand_rows(const Operand& op, int64_t batch, int64_t head, int64_t row) {
  return static_cast<const scalar_t*>(op.data) + batch * op.batch_stride + head * op.head_stride +
         row * op.row_stride;
}

// Rows [row, row + rows) of one head of an operand in the accumulation type T: read in place
// when the operand already has that type, else converted into scratch [rows x D].
template <typename scalar_t, typename T>
inline RowsView<T> operand_block(const Operand& op, int64_t batch, int64_t head, int64_t row,
                                 int64_t rows, int64_t dim, T* scratch) {
  return rows_as(operand_rows<scalar_t>(op, batch, head, row), op.row_stride, rows, dim, scratch);
}

}  // namespace CPU_CAPABILITY
}  // namespace sparse_attention::cpu
