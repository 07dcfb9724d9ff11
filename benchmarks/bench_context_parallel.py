"""Context parallelism on gloo processes of this machine against a dense ring (and torch's
context_parallel where it runs), and the traffic on paper for 128k to 1M tokens.

    python benchmarks/bench_context_parallel.py --out benchmarks/results/context-parallel
    python benchmarks/bench_context_parallel.py --help

The code lives in sparse_attention/benchmark/context_parallel.py."""

import sys

from sparse_attention.benchmark.context_parallel import main

if __name__ == "__main__":
    sys.exit(main())
