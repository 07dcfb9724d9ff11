"""Writes the README's pattern pictures to docs/patterns/ (one PNG per pattern family).

    .venv/bin/python scripts/pattern_pictures.py
"""

from __future__ import annotations

import pathlib

import sparse_attention as sa

SEQ_LEN, BLOCK = 2048, 64  # 32 x 32 blocks: small pictures in which every block shows

# file name -> (pattern, heads, causal)
PICTURES = {
    "local": (sa.from_name("local", seq_len=SEQ_LEN), 1, True),
    "strided": (sa.from_name("strided", seq_len=SEQ_LEN), 1, True),
    "fixed": (sa.from_name("fixed", seq_len=SEQ_LEN, num_patterns=2), 2, True),
    "dilated": (sa.from_name("dilated", seq_len=SEQ_LEN), 1, False),
    "global": (sa.Global(tokens=[0, 1000], block_size=BLOCK), 1, False),
    "random": (sa.from_name("random", seq_len=SEQ_LEN), 1, True),
    "bigbird": (sa.from_name("bigbird", seq_len=SEQ_LEN), 1, False),
    "longformer": (sa.from_name("longformer", seq_len=SEQ_LEN), 1, False),
    "union": (sa.Local(128) | sa.Dilated(512) | sa.Global(num_blocks=1, rows=False), 1, True),
    "deepspeed_variable": (sa.VariableSparsityConfig(1, BLOCK, local_window_blocks=[2, 4, 8],
                                                     global_block_indices=[0, 20]), 1, False),
}
# Shorter titles where the repr is long.
TITLES = {
    "union": "Local(128) | Dilated(512) | Global(num_blocks=1, rows=False)",
    "deepspeed_variable": "VariableSparsityConfig(local_window_blocks=[2, 4, 8],\nglobal_block_indices=[0, 20])",
}


def main() -> None:
    out_dir = pathlib.Path(__file__).resolve().parents[1] / "docs" / "patterns"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (pattern, heads, causal) in PICTURES.items():
        path = out_dir / f"{name}.png"
        title = TITLES.get(name, repr(pattern))
        sa.show(pattern, SEQ_LEN, heads, path, causal=causal,
                title=f"{title}\nN={SEQ_LEN}{', causal' if causal else ''}")
        print(f"wrote {path.relative_to(out_dir.parents[1])}")


if __name__ == "__main__":
    main()
