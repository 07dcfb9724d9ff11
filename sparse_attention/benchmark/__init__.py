"""The benchmarks: our op against torch SDPA and compiled FlexAttention.

- `sparse-attention bench` (also `python benchmarks/bench_attention.py`): the suite over a
  grid of patterns, lengths, head dims and dtypes (command.py; the grid in cases.py, the
  contenders in contenders.py and flex.py, the tables and plot in report.py).
- `sparse-attention speed` (speed.py): one long causal sequence, forward + backward.
- `python benchmarks/bench_cuda.py`: the GPU table, forward and backward timed apart.

They share one timer (timing.py), one machine description (machine.py) and one FLOP count
(flops.py, on top of BlockLayout.flops: 4 * bs^2 * D per computed block pair, backward 2.5x).
Peak memory comes from sparse_attention.measure, which training uses too."""
