"""The benchmark suite: our op against torch SDPA and compiled FlexAttention.

Run it with `python benchmarks/bench_attention.py` or `sparse-attention bench`; see
`command.py` for the flags and DESIGN notes in the README for how FLOPs are counted."""
