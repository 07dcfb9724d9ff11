"""The block grid of one call, and exact block covers of simple token-level rules.

A pattern is a rule on (query position p, key position j). Query i of a call with Nq queries
and Nk keys sits at absolute position p = i + Nk - Nq: aligned bottom-right, as the causal
rule is, so that decoding one token or prefilling a chunk against a longer key sequence
follows the rule of the same position in the full sequence (the block cover of a call's own
query blocks can be smaller than those blocks' rows in the full sequence).

A block (query block, key block) is computed when at least one (p, j) pair inside it obeys the
rule: the layout is the smallest block layout that covers the rule. Every method here finds
that cover from the first and last position of each block, with tensor ops over the
[q_blocks, k_blocks] grid: O(blocks), never O(N^2) elements.

Under causal attention a block's cover is taken over every position of the whole-sequence
block (`Grid.whole_blocks`): blocks of block_size from position 0, including positions past
the end of a sequence whose length is not a multiple of the block. Computed whole, a block
lets every query of it see the keys its cover holds, so a cover that depended on how many
of the block's positions exist would make a token's output depend on the tokens after it.
Taken whole, a token sees the same keys in any prefix of the sequence, in a prefill chunk
and in a decoding step as in the full forward pass.
"""

from __future__ import annotations

import torch

from sparse_attention.layout import num_blocks


class Grid:
    """First and last absolute positions of every query block (p_lo, p_hi: [qb, 1]) and key
    block (j_lo, j_hi: [1, kb]) of a call; rows: [qb, 1] block-aligned absolute query-block
    indices (qb_index + kb - qb) for patterns defined on blocks rather than tokens."""

    def __init__(self, q_len: int, k_len: int, block_size: int, seq_len: int | None = None):
        self.q_len, self.k_len, self.block_size = q_len, k_len, block_size
        self.seq_len = k_len if seq_len is None else seq_len  # tokens that exist (<= k_len)
        self.q_blocks, self.k_blocks = num_blocks(q_len, block_size), num_blocks(k_len, block_size)
        self.offset = k_len - q_len
        q_start = torch.arange(self.q_blocks) * block_size
        k_start = torch.arange(self.k_blocks) * block_size
        self.p_lo = (q_start + self.offset).unsqueeze(1)
        self.p_hi = ((q_start + block_size).clamp(max=q_len) - 1 + self.offset).unsqueeze(1)
        self.j_lo = k_start.unsqueeze(0)
        self.j_hi = ((k_start + block_size).clamp(max=k_len) - 1).unsqueeze(0)
        self.rows = (torch.arange(self.q_blocks) + self.k_blocks - self.q_blocks).unsqueeze(1)
        self.cols = torch.arange(self.k_blocks).unsqueeze(0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q_blocks, self.k_blocks

    @property
    def is_whole(self) -> bool:
        """Whether every block of this grid is a whole block of the sequence."""
        return self.offset % self.block_size == 0 and self.k_len % self.block_size == 0

    def whole_blocks(self) -> "Grid":
        """The grid of the whole-sequence blocks that hold this call's queries: from the block
        of the first query to the end of the last key block, every block block_size long."""
        if self.is_whole:
            return self
        bs = self.block_size
        k_len = self.k_blocks * bs
        return Grid(k_len - self.offset // bs * bs, k_len, bs, seq_len=self.seq_len)

    def rows_from_whole(self, mask: torch.Tensor) -> torch.Tensor:
        """[..., q_blocks, k_blocks] from a mask on `whole_blocks()`: each of this call's query
        blocks gets the union of the rows of the whole blocks it overlaps (one, unless the
        call starts inside a block and a query block straddles two)."""
        if self.is_whole:
            return mask
        bs, first = self.block_size, self.offset // self.block_size
        lo = torch.div(self.p_lo.squeeze(1), bs, rounding_mode="floor") - first
        hi = torch.div(self.p_hi.squeeze(1), bs, rounding_mode="floor") - first
        return mask[..., lo, :] | mask[..., hi, :]

    def query_positions(self) -> torch.Tensor:
        """Absolute position p of every query, [Nq]."""
        return torch.arange(self.q_len) + self.offset

    def key_positions(self) -> torch.Tensor:
        """Position j of every key, [Nk]."""
        return torch.arange(self.k_len)

    def visible(self) -> torch.Tensor:
        """Blocks with at least one key not after its query (j <= p): the blocks causal
        attention may compute."""
        return self.j_lo <= self.p_hi

    def _distance_bounds(self, lo, hi, causal: bool):
        """Smallest and largest d = p - j in each block, clipped to [lo, hi] (None: unbounded)
        and to d >= 0 under causal."""
        d_min, d_max = self.p_lo - self.j_hi, self.p_hi - self.j_lo
        if causal:
            lo = 0 if lo is None else max(lo, 0)
        if lo is not None:
            d_min = d_min.clamp(min=lo)
        if hi is not None:
            d_max = d_max.clamp(max=hi)
        return d_min, d_max

    def band(self, lo: int | None, hi: int | None, causal: bool) -> torch.Tensor:
        """Blocks holding a pair with lo <= p - j <= hi."""
        d_min, d_max = self._distance_bounds(lo, hi, causal)
        return d_min <= d_max

    def multiples(self, step: int, lo: int | None, hi: int | None, causal: bool) -> torch.Tensor:
        """Blocks holding a pair with p - j a multiple of step and lo <= p - j <= hi."""
        d_min, d_max = self._distance_bounds(lo, hi, causal)
        first = -torch.div(-d_min, step, rounding_mode="floor") * step  # first multiple >= d_min
        return first <= d_max

    def same_chunk(self, length: int, causal: bool) -> torch.Tensor:
        """Blocks holding a pair with floor(p / length) == floor(j / length). Under causal
        j <= p as well; when the chunk ranges meet, that only needs j_lo <= p_hi."""
        def chunk(x):
            return torch.div(x, length, rounding_mode="floor")

        meet = (chunk(self.p_lo) <= chunk(self.j_hi)) & (chunk(self.j_lo) <= chunk(self.p_hi))
        return meet & self.visible() if causal else meet

    def key_set(self, selected: torch.Tensor, causal: bool) -> torch.Tensor:
        """Blocks holding a pair whose key is selected (bool [..., Nk]); [..., qb, kb].
        Under causal the key must not be after the block's last query."""
        whole = _any_in_ranges(selected, self.j_lo, self.j_hi)  # per key block: [..., 1, kb]
        if not causal:
            return whole.expand(*whole.shape[:-2], *self.shape)
        # Only the key block holding a row's last query p_hi is cut (at p_hi); later blocks
        # are empty. The cut is one range per row, so no [qb, kb] gather is needed.
        cut = _any_in_ranges(selected, self.p_hi - self.p_hi % self.block_size, self.p_hi)
        return torch.where(self.j_hi <= self.p_hi, whole, (self.j_lo <= self.p_hi) & cut)

    def query_set(self, selected: torch.Tensor, causal: bool) -> torch.Tensor:
        """Blocks holding a pair whose query is selected (bool [..., Nq], by query index);
        [..., qb, kb]. Under causal the query must not be before the block's first key."""
        whole = _any_in_ranges(selected, self.p_lo - self.offset, self.p_hi - self.offset)
        if not causal:
            return whole.expand(*whole.shape[:-2], *self.shape)
        # A key block that starts inside a query block (there is at most one: blocks are
        # block_size long) sees only the queries from its start on.
        start = self.p_lo - self.p_lo % self.block_size + self.block_size
        cut = _any_in_ranges(selected, start - self.offset, self.p_hi - self.offset)
        return torch.where(self.j_lo <= self.p_lo, whole, (self.j_lo <= self.p_hi) & cut)


def _any_in_ranges(selected: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Whether selected[..., lo:hi + 1] holds a True, for every (lo, hi) pair, by prefix sums."""
    n = selected.shape[-1]
    counts = torch.nn.functional.pad(selected.to(torch.int32).cumsum(-1), (1, 0))
    lo = lo.clamp(0, n)
    hi = torch.maximum((hi + 1).clamp(max=n), lo)  # an empty range gives hi == lo
    return counts[..., hi] > counts[..., lo]


def whole_block_pieces(q_len: int, k_len: int, block_size: int) -> list[tuple[int, int, int]]:
    """Splits a call of Nq queries (the last of Nk positions) into pieces whose query blocks
    each lie inside one whole-sequence block: (first query, end query, keys) each, the keys
    being the positions up to the piece's last query. One piece unless the call starts inside
    a block and runs past its end; then the queries up to that block's end come first."""
    head = -(k_len - q_len) % block_size
    if head == 0 or q_len <= head:
        return [(0, q_len, k_len)]
    return [(0, head, k_len - q_len + head), (head, q_len, k_len)]

