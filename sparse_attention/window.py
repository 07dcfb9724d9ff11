"""Window: the exact token window around the bottom-right diagonal, in one representation.

Query i of Nq sees key j of Nk when -left <= j - i - (Nk - Nq) <= right; None is unbounded on
that side. Callers, patterns, the reference and the dispatch use this form; only the typed op
wrappers in sparse_attention.ops turn it into the kernels' integers (-1 = unbounded).
"""

from __future__ import annotations

from typing import NamedTuple


class Window(NamedTuple):
    left: int | None = None
    right: int | None = None

    @classmethod
    def of(cls, window) -> "Window":
        """A Window from None, a Window or a (left, right) pair of ints >= 0 or None."""
        if window is None:
            return cls()
        if not (isinstance(window, tuple) and len(window) == 2):
            raise TypeError("window: expected a (left, right) tuple of ints >= 0 or None")
        for name, w in zip(("left", "right"), window):
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
                raise ValueError(f"window: {name} must be an int >= 0 or None, got {w!r}")
        return cls(*window)

    @classmethod
    def resolve(cls, window, *, causal: bool, pattern_window=None) -> "Window":
        """The window a call applies: the caller's (ints >= 0 or None), narrowed by a pattern's
        exact token window, with right = 0 under causal."""
        left, right = cls.of(window)
        if pattern_window is not None:
            left = pattern_window[0] if left is None else min(left, pattern_window[0])
            right = pattern_window[1] if right is None else min(right, pattern_window[1])
        if causal:
            right = 0 if right is None else min(right, 0)
        return cls(left, right)

    def kernel_bounds(self) -> tuple[int, int]:
        """(left, right) as the kernels take them: -1 = unbounded."""
        return (-1 if self.left is None else self.left, -1 if self.right is None else self.right)

    @classmethod
    def from_kernel_bounds(cls, left: int, right: int) -> "Window":
        """The Window of the kernels' (left, right), -1 = unbounded (the ops' int arguments)."""
        return cls(None if left < 0 else left, None if right < 0 else right)
