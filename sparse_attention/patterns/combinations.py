"""BigBird and Longformer: named unions of local, global and random parts."""

from __future__ import annotations

from sparse_attention.patterns.arguments import check_block_size, check_int, check_int_list
from sparse_attention.patterns.composite import Union
from sparse_attention.patterns.global_random import Global, Random
from sparse_attention.patterns.local import Local


class BigBird(Union):
    """BigBird (Zaheer et al. 2020, block form): a window of blocks around the diagonal, the
    first global blocks as rows and columns, and random blocks per row.

    Args:
        num_window_blocks: blocks in the window, centred on the diagonal block
            (num_window_blocks // 2 on each side; the paper uses 3).
        num_global_blocks: first blocks that are global rows and columns (0: none).
        num_random_blocks: random key blocks per row (0: none), see `Random`.
        seed, per_head: of the random blocks.
        block_size: tokens per block.
    """

    def __init__(self, *, num_window_blocks: int = 3, num_global_blocks: int = 2,
                 num_random_blocks: int = 3, seed: int = 0, per_head: bool = False,
                 block_size: int = 64):
        check_block_size(block_size)
        side = check_int("num_window_blocks", num_window_blocks, minimum=1) // 2
        parts = [Local(max(1, side * block_size), block_size=block_size)]
        if check_int("num_global_blocks", num_global_blocks) > 0:
            parts.append(Global(num_blocks=num_global_blocks, block_size=block_size))
        if check_int("num_random_blocks", num_random_blocks) > 0:
            parts.append(Random(num_random_blocks, seed=seed, per_head=per_head, block_size=block_size))
        super().__init__(*parts)
        self.settings = dict(num_window_blocks=num_window_blocks, num_global_blocks=num_global_blocks,
                             num_random_blocks=num_random_blocks, seed=seed, per_head=per_head,
                             block_size=block_size)

    def _describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


class Longformer(Union):
    """Longformer (Beltagy et al. 2020, block form): a sliding window plus global tokens that
    attend to and are attended by every token.

    Args:
        window: tokens on each side of the diagonal, see `Local`.
        global_tokens: absolute positions of the global tokens (default [0], a CLS token).
        block_size: tokens per block.
    """

    def __init__(self, window: int, *, global_tokens=(0,), block_size: int = 64):
        global_tokens = check_int_list("global_tokens", global_tokens)
        super().__init__(Local(window, block_size=block_size),
                         Global(tokens=global_tokens, block_size=block_size))
        self.window, self.global_tokens = window, global_tokens

    def _describe(self) -> str:
        return (f"window={self.window}, global_tokens={list(self.global_tokens)}, "
                f"block_size={self.block_size}")
