"""Run-time switches the benchmarks time on and off: environment variables the op reads on
every call (the opt-in CUDA paths)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def variable(name: str, value: str):
    """The environment variable `name` set to `value` inside the block, as it was after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved
