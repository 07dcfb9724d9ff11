"""Benchmark suite: block-sparse attention against torch SDPA and compiled FlexAttention.

    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --help

Same as `sparse-attention bench`; the code lives in sparse_attention/benchmark/."""

from sparse_attention.benchmark.command import main

if __name__ == "__main__":
    main()
