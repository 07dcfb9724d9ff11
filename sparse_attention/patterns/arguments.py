"""Argument checks shared by the patterns: each error names the argument and what was expected."""

from __future__ import annotations

from sparse_attention.layout import check_block_size


def check_int(name: str, value, *, minimum: int = 0) -> int:
    """An int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_multiple_of_block(name: str, value, block_size: int) -> int:
    """A positive token length that is a whole number of blocks."""
    check_int(name, value, minimum=1)
    if value % block_size:
        raise ValueError(
            f"{name}: expected a multiple of block_size ({block_size}) tokens, got {value}"
        )
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_int_list(name: str, values, *, minimum: int = 0) -> tuple[int, ...]:
    """A non-empty sequence of ints >= minimum."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}: expected a list of ints, got {type(values).__name__}")
    values = tuple(values)
    if not values:
        raise ValueError(f"{name}: expected at least one index, got none")
    for value in values:
        check_int(name, value, minimum=minimum)
    return values


def renamed(error: Exception, old: str, new: str) -> Exception:
    """The same error, naming the argument as the caller knows it (old -> new)."""
    return type(error)(str(error).replace(old, new, 1))


def check_attention(attention) -> str:
    """DeepSpeed's attention direction."""
    if attention not in ("unidirectional", "bidirectional"):
        raise ValueError(
            f"attention: expected 'unidirectional' or 'bidirectional', got {attention!r}"
        )
    return attention


__all__ = ["check_attention", "check_block_size", "check_bool", "check_int", "check_int_list",
           "check_multiple_of_block", "renamed"]
