"""The bookkeeping every chunk-store tier shares: what it holds, in how many bytes, which
entry goes next (PGDSF), and its counters.

A tier is this index plus where the KV lives (a dict of tensors for host memory, files for
disk); the index never touches the KV itself, so the disk tier can rebuild it from file
headers alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from covey.cache.chunk_kv import ChunkKV
from covey.cache.pgdsf import PGDSF


@dataclass(frozen=True)
class EntryMeta:
    """An entry without its KV: enough to find it, check a hit and price it."""

    key: str
    chunk_id: str | None
    token_ids: tuple[int, ...]
    content: str
    context_hash: str
    start_position: int
    nbytes: int

    @classmethod
    def of(cls, entry: ChunkKV) -> EntryMeta:
        return cls(
            key=entry.key,
            chunk_id=entry.chunk_id,
            token_ids=entry.token_ids,
            content=entry.content,
            context_hash=entry.context_hash,
            start_position=entry.start_position,
            nbytes=entry.nbytes,
        )


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0  # entries pushed out by capacity pressure
    stale: int = 0  # entries dropped because their chunk_id now names other text


class TierIndex:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.bytes = 0
        self.counters = TierCounters()
        self.policy = PGDSF()
        self.metas: dict[str, EntryMeta] = {}
        self._by_content: dict[str, dict[str, None]] = {}
        self._by_chunk_id: dict[str, dict[str, None]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.metas

    def __len__(self) -> int:
        return len(self.metas)

    def add(self, meta: EntryMeta, cost: float, frequency: int) -> None:
        """Record `meta` (the caller made room first)."""
        self.metas[meta.key] = meta
        self.bytes += meta.nbytes
        self._by_content.setdefault(meta.content, {})[meta.key] = None
        if meta.chunk_id is not None:
            self._by_chunk_id.setdefault(meta.chunk_id, {})[meta.key] = None
        self.policy.add(meta.key, meta.nbytes, cost, frequency)

    def remove(self, key: str) -> EntryMeta:
        """Forget `key` without counting an eviction."""
        meta = self._unlink(key)
        self.policy.remove(key)
        return meta

    def pop_victim(self, protected: Callable[[str], bool]) -> tuple[EntryMeta, int] | None:
        """Evict the PGDSF victim that `protected` does not hold: (its meta, its frequency),
        or None when none is left.

        Mutates: the policy's clock and the eviction counter.
        """
        victim = self.policy.pop_victim(protected)
        if victim is None:
            return None
        key, frequency = victim
        self.counters.evictions += 1
        return self._unlink(key), frequency

    def fits(self, nbytes: int, protected: Callable[[str], bool]) -> bool:
        """Whether evicting every unprotected entry would leave room for `nbytes`; so a
        put that cannot succeed is refused before anything is evicted."""
        held = sum(meta.nbytes for key, meta in self.metas.items() if protected(key))
        return held + nbytes <= self.capacity

    def find_any(self, content: str) -> str | None:
        """Of the entries holding these tokens (after any context), the most valuable."""
        keys = self._by_content.get(content)
        if not keys:
            return None
        return max(keys, key=self.policy.priority)

    def stale_keys(self, chunk_id: str, content: str) -> list[str]:
        """Entries recorded under `chunk_id` whose tokens are not `content`."""
        keys = self._by_chunk_id.get(chunk_id, {})
        return [key for key in keys if self.metas[key].content != content]

    def has_content(self, content: str) -> bool:
        return bool(self._by_content.get(content))

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
            "bytes": self.bytes,
            "entries": len(self.metas),
            "stale": c.stale,
        }

    def _unlink(self, key: str) -> EntryMeta:
        meta = self.metas.pop(key)
        self.bytes -= meta.nbytes
        _discard(self._by_content, meta.content, key)
        if meta.chunk_id is not None:
            _discard(self._by_chunk_id, meta.chunk_id, key)
        return meta


def _discard(index: dict[str, dict[str, None]], name: str, key: str) -> None:
    keys = index[name]
    del keys[key]
    if not keys:
        del index[name]
