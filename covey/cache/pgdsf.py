"""PGDSF eviction (RAGCache's Prefix-aware Greedy-Dual-Size-Frequency), one per tier.

Each entry's priority is `clock + frequency * cost / size`: what it saves per byte (the
seconds a recompute would cost, times how often it is used), lifted by the clock. Evicting
an entry sets the clock to its priority, and every later insert or access is priced at the
new clock, so entries that stop being used age out behind fresher ones even when their
frequency once was high: GDSF's answer to LFU's pollution.

Candidates sit in a binary heap keyed by (priority, stamp); an access pushes a fresh copy
and the old one is skipped when it surfaces (lazy deletion), so an access or an eviction
costs O(log n). Equal priorities evict the least recently stamped first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Item:
    size: int
    cost: float
    frequency: int
    priority: float
    stamp: int


class PGDSF:
    def __init__(self) -> None:
        self.clock = 0.0
        self._items: dict[str, _Item] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._stamps = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def add(self, key: str, size: int, cost: float, frequency: int = 1) -> float:
        """Track `key` (replacing any earlier record of it); return its priority.

        `cost` is in seconds and is floored at 0 (a fitted profile can dip below zero for
        short spans); `frequency` carries accesses over from another tier or a restart.
        """
        if size <= 0:
            raise ValueError(f"size must be > 0 bytes, got {size}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        item = _Item(size=size, cost=max(float(cost), 0.0), frequency=frequency, priority=0.0,
                     stamp=0)
        self._items[key] = item
        self._reprice(key, item)
        return item.priority

    def touch(self, key: str) -> float:
        """Count one access to `key` and reprice it at the current clock."""
        item = self._items[key]
        item.frequency += 1
        self._reprice(key, item)
        return item.priority

    def remove(self, key: str) -> None:
        """Forget `key` without an eviction: the clock stays where it is."""
        del self._items[key]

    def frequency(self, key: str) -> int:
        return self._items[key].frequency

    def priority(self, key: str) -> float:
        return self._items[key].priority

    def pop_victim(self, skip: Callable[[str], bool] | None = None) -> tuple[str, int] | None:
        """Evict the lowest-priority key that `skip` does not protect: (key, its frequency),
        or None when none is left.

        Mutates: the clock becomes the victim's priority.
        """
        skipped: list[tuple[float, int, str]] = []
        victim = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            priority, stamp, key = entry
            item = self._items.get(key)
            if item is None or item.stamp != stamp:
                continue  # removed, or repriced since this copy was pushed
            if skip is not None and skip(key):
                skipped.append(entry)
                continue
            victim = (key, item.frequency)
            self.clock = priority
            del self._items[key]
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return victim

    def _reprice(self, key: str, item: _Item) -> None:
        item.priority = self.clock + item.frequency * item.cost / item.size
        item.stamp = next(self._stamps)
        heapq.heappush(self._heap, (item.priority, item.stamp, key))
        if len(self._heap) > 2 * len(self._items) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop the heap's outdated copies, so accesses do not grow it without bound."""
        self._heap = [
            (item.priority, item.stamp, key) for key, item in self._items.items()
        ]
        heapq.heapify(self._heap)
