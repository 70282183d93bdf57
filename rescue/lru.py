"""One small bounded cache for every layer (metadata tables, inflated
clusters, fetched blocks, open segment files).

Capacity counts entries, or bytes when `weight` is given; `on_evict` hears
about what falls out (to close a file, say). Not thread-safe: callers that
share one across threads hold their own lock, as they must anyway around
the load that fills it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, capacity: int, *, weight: Callable[[V], int] | None = None,
                 on_evict: Callable[[K, V], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self._weight = weight
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self.used = 0   # entries, or bytes with `weight`

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The cached value (None too), else `load()`'s (then cached)."""
        try:
            self._items.move_to_end(key)
            return self._items[key]
        except KeyError:
            pass
        value = load()
        self.put(key, value)
        return value

    def peek(self, key: K) -> V | None:
        """The cached value (marked as just used), or None."""
        try:
            self._items.move_to_end(key)
        except KeyError:
            return None
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= self._cost(old)
        self._items[key] = value
        self.used += self._cost(value)
        while self.used > self.capacity and len(self._items) > 1:
            gone_key, gone = self._items.popitem(last=False)
            self.used -= self._cost(gone)
            if self._on_evict is not None:
                self._on_evict(gone_key, gone)

    def _cost(self, value: V) -> int:
        return self._weight(value) if self._weight is not None else 1

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Take an entry out without `on_evict` (the caller deals with it)."""
        if key not in self._items:
            return default
        value = self._items.pop(key)
        self.used -= self._cost(value)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.used = 0
