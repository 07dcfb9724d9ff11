"""Score terms (sinks, ALiBi, softcap, T5 position bias, dropout): their cost over the plain
kernels, beside compiled FlexAttention's score_mod for the same term.

    python benchmarks/bench_score_terms.py --out benchmarks/results/cpu-score-terms
    python benchmarks/bench_score_terms.py --help

The code lives in sparse_attention/benchmark/score_terms.py."""

import sys

from sparse_attention.benchmark.score_terms import main

if __name__ == "__main__":
    sys.exit(main())
