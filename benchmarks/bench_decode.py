"""One decode step over a long cache with a local + global layout: ours (with its split of long
rows, and on one thread) against SDPA masked and dense and compiled FlexAttention.

    python benchmarks/bench_decode.py --out benchmarks/results/cpu-decode
    python benchmarks/bench_decode.py --help

The code lives in sparse_attention/benchmark/decode.py."""

import sys

from sparse_attention.benchmark.decode import main

if __name__ == "__main__":
    sys.exit(main())
