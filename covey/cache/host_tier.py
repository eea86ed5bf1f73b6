"""The chunk store's host-memory tier: entries' CPU tensors under a byte capacity.

Capacity counts the KV bytes each entry holds (and its stored blend scores); an entry whose
tensor is a view into a larger buffer is stored as a compact copy, so the count is what the
tier really keeps alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from covey.cache.chunk_kv import ChunkKV
from covey.cache.tier_index import EntryMeta, TierIndex


class HostTier:
    def __init__(self, capacity_bytes: int) -> None:
        self.index = TierIndex(capacity_bytes)
        self._entries: dict[str, ChunkKV] = {}

    def get(self, key: str) -> ChunkKV | None:
        return self._entries.get(key)

    def add(self, entry: ChunkKV, cost: float, frequency: int) -> ChunkKV:
        """Keep `entry` (the caller made room); return the copy kept."""
        kv = entry.kv
        own = kv.numel() * kv.element_size()  # the KV's bytes alone (nbytes adds the scores)
        if kv.device.type != "cpu" or kv.untyped_storage().nbytes() > own:
            kv = kv.to("cpu", copy=True).contiguous()
            entry = replace(entry, kv=kv)
        self._entries[entry.key] = entry
        self.index.add(EntryMeta.of(entry), cost, frequency)
        return entry

    def replace_scores(self, key: str, scores: torch.Tensor, cost: float) -> ChunkKV:
        """Give the entry at `key` new blend scores (entries are frozen: a new one takes its
        place, with its frequency; its bytes grow by the scores' when it had none, which
        the caller makes room for)."""
        entry = self._entries[key]
        frequency = self.index.policy.frequency(key)
        self.index.remove(key)
        entry = replace(entry, scores=scores.to("cpu", torch.float16).contiguous())
        self._entries[key] = entry
        self.index.add(EntryMeta.of(entry), cost, frequency)
        return entry

    def remove(self, key: str) -> ChunkKV:
        self.index.remove(key)
        return self._entries.pop(key)

    def pop_victim(self, protected: Callable[[str], bool]) -> tuple[ChunkKV, int] | None:
        """Evict by PGDSF; the victim and its frequency (for the disk tier)."""
        victim = self.index.pop_victim(protected)
        if victim is None:
            return None
        meta, frequency = victim
        return self._entries.pop(meta.key), frequency
