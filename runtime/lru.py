"""A small bounded map, least recently used out: caches of shapes, captures and prompt K/V."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
# Entries kept by default (each may hold static buffers or a captured graph).
MAX_CAPTURES = 8


class LRU(Generic[K, V]):
    def __init__(self, size: int = MAX_CAPTURES):
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
