"""BoundedCache: the thread-safe memo of recent results that patterns (layouts per length)
and attention dispatchers (a path per call shape) keep."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

# Entries kept per cache: decoding asks for a new key length every step, so caches are bounded.
CACHE_SIZE = 64


class BoundedCache:
    """The most recent `size` results by key. Safe across threads: a value is computed outside
    the lock, and if two threads compute one key, both get the first value stored. Copies and
    pickles (of a model holding the owner) start empty, with a lock of their own."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value stored for key, computing and storing compute() when there is none."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            value = self._items.setdefault(key, value)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])
