"""The chunk KV store: retrieved chunks' KV kept across requests, in host memory and on disk.

The engine's pool is the fastest tier (its prefix cache); this store is the next two: a
host-memory tier with a byte capacity, and an optional disk tier that survives a restart.
Each evicts by PGDSF (RAGCache): what a recompute would cost, times how often the entry is
used, per byte, with a clock that ages what stops being used.

Lookups:
- `get_exact(context_hash, tokens)`: the KV of these tokens computed after exactly this
  context (chain hash of every token before them); reusing it is lossless.
- `get_any(chunk_id, tokens)`: the KV of these tokens computed after any context, for
  blending. Keyed by the tokens' hash: a chunk_id whose text changed never gets the old
  text's KV; the old entries are dropped and counted as "stale".
A host hit is served from memory; a disk hit is read and promoted to host. An entry evicted
from host is written to disk only if disk does not already hold it (swap out once), so an
entry read back from disk costs nothing to evict again. Blend scores merged into a host
entry reach its disk copy as a small scores file of their own (DiskTier), never by
rewriting the KV.

Score refresh: scores merged from one or two contexts would otherwise freeze. The store
counts how many blends chose by an entry's stored scores since they were last measured
(`note_stored_use`); once enough have, `scores_fresh` says no, so the next blend of it runs
the check layers and merges a new measurement (which resets the count). Enough is
`SCORES_REFRESH_USES` after the first measurement, then twice as many after each further
one, up to `SCORES_REFRESH_MAX_USES`: every measurement is a check, costlier than a
stored-score blend, and on a Zipf-popular corpus a fixed interval made the most read chunks
pay one every few requests. Measurements merge as a running mean (`ChunkKV.merged_scores`
with weight 1 / (count + 1)) over the first SCORES_MEAN_OVER, a moving average after: each
later one moves a chunk's scores less, which is what makes measuring it less often
reasonable, and the late ones still move them. The counts live in memory (a restart starts them
again) and only for entries some tier holds: they go when the host tier evicts an entry disk
does not hold, when the disk tier evicts (it reports the keys) or drops an unreadable file of
an entry host does not hold, when a chunk's text goes stale, and when new scores fail to reach
its disk copy (which then reads back with its older scores, as measured once).

Leases: an entry being copied into the pool is leased (`with store.lease(entry): ...`), and
eviction skips leased entries, so a put that would need their room is refused instead. A
stale entry goes even while leased (its text is gone); the holder still has its tensor.

No copies: `put` keeps the caller's tensor when it is a compact CPU tensor, and lookups
return the stored tensor. Neither side may write to it afterwards (re-rotate a copy, e.g.
in the pool, never the returned `kv` in place).

Threads: the engine calls the store from its own thread only, but every public method takes
one re-entrant lock, so a warm-up running on another thread cannot interleave a mutation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from covey.cache.chunk_kv import (
    ROOT_HASH,
    STANDALONE_PREFIX,
    ChunkKV,
    chain_hash,
    content_hash,
    entry_key,
)
from covey.cache.disk_tier import DiskTier
from covey.cache.host_tier import HostTier
from covey.cache.tier_index import TierIndex
from covey.errors import ConfigError, EngineUnavailableError

log = logging.getLogger(__name__)

SCORES_REFRESH_USES = 8  # stored-score blends of an entry before it is measured again
SCORES_REFRESH_MAX_USES = 64  # ... doubling after each measurement, up to this
SCORES_MEAN_OVER = 8  # measurements the running mean spans; later ones weigh 1/(this + 1)

__all__ = [
    "ROOT_HASH",
    "STANDALONE_PREFIX",
    "ChunkKV",
    "ChunkStore",
    "chain_hash",
    "content_hash",
]


class ChunkStore:
    def __init__(
        self,
        host_bytes: int,
        cost_fn: Callable[[int], float],
        disk_dir: str | Path | None = None,
        disk_bytes: int = 2 << 30,
        fingerprint: str = "",
        scores_tag: str = "",
    ) -> None:
        """`cost_fn(n)`: seconds to recompute n tokens (the engine's prefill profile).

        `fingerprint`: what the KV depends on besides the tokens (model, dtype, RoPE
        settings). The disk tier keeps each fingerprint's entries in a folder of their own,
        so a restart with another model never reads KV computed by the old one.
        `scores_tag`: what blend scores depend on (check layers, score kind); scores on
        disk written under another tag are not read back (the KV is).
        """
        if host_bytes < 0:
            raise ConfigError(f"chunk_store_bytes must be >= 0, got {host_bytes}")
        if disk_bytes <= 0:
            raise ConfigError(f"chunk_store_disk_bytes must be > 0, got {disk_bytes}")
        self._cost_fn = cost_fn
        self._host = HostTier(host_bytes)
        self._disk = None
        if disk_dir is not None:
            folder = Path(disk_dir).expanduser()
            if fingerprint:
                digest = hashlib.blake2b(fingerprint.encode(), digest_size=8).hexdigest()
                folder = folder / f"kv-{digest}"
            self._disk = DiskTier(folder, disk_bytes, cost_fn, scores_tag)
            if fingerprint:
                _write_note(folder / "fingerprint.txt", fingerprint)
        self._leases: dict[str, int] = {}
        self._rescored: set[str] = set()  # host entries whose scores the disk copy lacks
        self._score_uses: dict[str, int] = {}  # stored-score blends since last measured
        self._score_measures: dict[str, int] = {}  # measurements merged since unscored
        self._lock = threading.RLock()
        self._closed = False

    @property
    def has_disk(self) -> bool:
        """Whether a disk tier is below the host tier (something `warm_chunks` can load)."""
        return self._disk is not None

    def put(self, entry: ChunkKV) -> bool:
        """Keep `entry` in host memory, evicting to make room; False when refused (larger
        than the host tier, or the room is leased). Never fails for a full store."""
        with self._lock:
            self._check_open()
            if entry.chunk_id is not None:
                self._drop_stale(entry.chunk_id, entry.content)
            key = entry.key
            if self._host.get(key) is not None:
                return True
            frequency = 1
            if self._disk is not None and self._disk.has(key):
                frequency = self._disk.frequency(key)
                if entry.scores is None:  # keep the scores measured before
                    scores = self._disk.load_scores(key)
                    if scores is not None:
                        entry = replace(entry, scores=scores)
            return self._admit(entry, frequency) is not None

    def get_exact(self, context_hash: str, token_ids: Sequence[int]) -> ChunkKV | None:
        """The KV of `token_ids` computed right after the context hashed `context_hash`."""
        with self._lock:
            self._check_open()
            tokens = tuple(token_ids)
            return self._lookup(entry_key(context_hash, content_hash(tokens)), tokens)

    def get_any(self, chunk_id: str | None, token_ids: Sequence[int]) -> ChunkKV | None:
        """The KV of `token_ids` computed after any context (for blending); of several, the
        one PGDSF values most. Entries filed under `chunk_id` with other text are dropped
        and counted stale."""
        with self._lock:
            self._check_open()
            tokens = tuple(token_ids)
            content = content_hash(tokens)
            if chunk_id is not None:
                self._drop_stale(chunk_id, content)
            key = self._host.index.find_any(content)
            if key is None and self._disk is not None:
                key = self._disk.index.find_any(content)
            return self._lookup(key, tokens)

    def contains_any(self, token_ids: Sequence[int]) -> bool:
        """Whether some tier holds these tokens' KV, after any context; for planning, so no
        counter or priority moves."""
        with self._lock:
            content = content_hash(tuple(token_ids))
            return self._host.index.has_content(content) or (
                self._disk is not None and self._disk.index.has_content(content)
            )

    def contains_exact(self, context_hash: str, token_ids: Sequence[int]) -> bool:
        """Whether some tier holds these tokens' KV after exactly this context; no counter
        or priority moves."""
        with self._lock:
            key = entry_key(context_hash, content_hash(tuple(token_ids)))
            return key in self._host.index or (self._disk is not None and self._disk.has(key))

    def update_scores(self, entry: ChunkKV, offset: int, scores: torch.Tensor) -> bool:
        """Merge blend scores measured for `entry`'s tokens [offset, offset + len(scores))
        into the host tier's copy (`ChunkKV.merged_scores`); False when host no longer
        holds it (the scores are then dropped: the next blend measures them again). A disk
        copy gets them (its scores file, not its KV) when the host entry is swapped out.
        Host may stay over capacity by the scores' bytes when every other entry is leased."""
        with self._lock:
            self._check_open()
            held = self._host.get(entry.key)
            if held is None:
                return False
            measured = self._measures(held)
            merged = held.merged_scores(
                offset, scores, weight=1.0 / (min(measured, SCORES_MEAN_OVER) + 1)
            )
            self._host.replace_scores(held.key, merged, self._cost_fn(len(held.token_ids)))
            self._score_uses.pop(held.key, None)
            self._score_measures[held.key] = measured + 1
            if self._disk is not None and self._disk.has(held.key):
                self._rescored.add(held.key)
            host = self._host.index
            while host.bytes > host.capacity:  # the scores' few bytes, when they were new
                victim = self._host.pop_victim(lambda k: k == held.key or self._leased(k))
                if victim is None:
                    break
                self._forget_counts(self._swap_out(*victim))
            return True

    def scores_fresh(self, entry: ChunkKV) -> bool:
        """Whether `entry`'s stored scores may still choose a blend's rows (fewer blends
        chose by them since they were measured than `refresh_after` allows)."""
        with self._lock:
            return self._score_uses.get(entry.key, 0) < self.refresh_after(entry)

    def refresh_after(self, entry: ChunkKV) -> int:
        """How many stored-score blends `entry`'s scores serve before the next measurement:
        SCORES_REFRESH_USES, doubled per measurement merged beyond the first, at most
        SCORES_REFRESH_MAX_USES. The count is in memory: an entry back from disk within one
        process keeps it; after a restart its stored scores count as one measurement."""
        with self._lock:
            extra = max(self._measures(entry) - 1, 0)
            # min(extra, 8): the cap is reached long before; it only bounds the shift.
            return min(SCORES_REFRESH_USES << min(extra, 8), SCORES_REFRESH_MAX_USES)

    def _measures(self, entry: ChunkKV) -> int:
        """Measurements merged into `entry`'s scores: counted since it was unscored, or 1
        for scores whose count is not known (read back after a restart)."""
        held = self._host.get(entry.key)
        scored = (held or entry).scores is not None
        return self._score_measures.get(entry.key, 1 if scored else 0)

    def note_stored_use(self, entry: ChunkKV) -> None:
        """A blend chose rows by `entry`'s stored scores (counts toward a refresh); not
        counted when no tier holds it any more (evicted since the blend looked it up)."""
        with self._lock:
            if self._held(entry.key):
                self._score_uses[entry.key] = self._score_uses.get(entry.key, 0) + 1

    @contextmanager
    def lease(self, entry: ChunkKV) -> Iterator[ChunkKV]:
        """Hold `entry` against eviction while its KV is copied."""
        self.acquire(entry)
        try:
            yield entry
        finally:
            self.release(entry)

    def acquire(self, entry: ChunkKV) -> None:
        with self._lock:
            self._leases[entry.key] = self._leases.get(entry.key, 0) + 1

    def release(self, entry: ChunkKV) -> None:
        with self._lock:
            count = self._leases.get(entry.key, 0)
            if count == 0:
                raise ValueError("ChunkStore.release: this entry is not leased")
            if count == 1:
                del self._leases[entry.key]
            else:
                self._leases[entry.key] = count - 1

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per tier: hits, misses, evictions, bytes, entries, stale. A lookup that
        misses host and hits disk counts a host miss and a disk hit; with no disk tier the
        disk counters stay 0."""
        with self._lock:
            disk = self._disk.index if self._disk is not None else TierIndex(0)
            return {"host": self._host.index.stats(), "disk": disk.stats()}

    def close(self) -> None:
        """Write host entries that disk does not hold yet to disk (so a restart finds them,
        space allowing), then drop host memory. Idempotent; later lookups raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            index = self._host.index
            for key in sorted(index.metas, key=index.policy.priority):
                frequency = index.policy.frequency(key)
                self._forget_counts(self._swap_out(self._host.remove(key), frequency))
            self._rescored.clear()
            self._score_uses.clear()
            self._score_measures.clear()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lookup(self, key: str | None, tokens: tuple[int, ...]) -> ChunkKV | None:
        """Host, then disk (promoting a disk hit to host); counts a hit or miss per tier."""
        host = self._host.index
        entry = self._host.get(key) if key is not None else None
        if entry is not None and entry.token_ids == tokens:
            host.counters.hits += 1
            host.policy.touch(entry.key)
            if self._disk is not None and self._disk.has(entry.key):
                self._disk.touch(entry.key)
            return entry
        host.counters.misses += 1
        disk = self._disk
        if disk is None:
            return None
        if key is not None and disk.has(key) and disk.index.metas[key].token_ids == tokens:
            entry = disk.load(key)
            if entry is not None:
                disk.index.counters.hits += 1
                disk.touch(key)
                return self._admit(entry, disk.frequency(key)) or entry
            self._forget_counts((key,))  # its file no longer read: dropped
        disk.index.counters.misses += 1
        return None

    def _admit(self, entry: ChunkKV, frequency: int) -> ChunkKV | None:
        """Put `entry` in host, evicting unleased entries by PGDSF (each swapped out once);
        None when it cannot fit."""
        host = self._host.index
        if not host.fits(entry.nbytes, self._leased):
            return None
        if entry.scores is None:  # to be measured afresh: the refresh interval starts over
            self._score_measures.pop(entry.key, None)
        gone: list[str] = []
        while host.bytes + entry.nbytes > host.capacity:
            victim = self._host.pop_victim(self._leased)
            assert victim is not None  # fits() said the unleased entries make room
            gone += self._swap_out(*victim)
        added = self._host.add(entry, self._cost_fn(len(entry.token_ids)), frequency)
        # Only now: writing a victim may evict `entry`'s own disk file, leaving it in no
        # tier until the add above, and its counts must outlive that moment.
        self._forget_counts(gone)
        return added

    def _swap_out(self, entry: ChunkKV, frequency: int) -> list[str]:
        """Write `entry` to disk unless disk holds it already (then only its scores, when
        they changed: the KV on disk is never rewritten or removed for them). Returns the
        keys that may have left every tier (`entry`'s and what the disk evicted for it),
        whose counts the caller forgets (`_forget_counts`) once the tiers are settled."""
        gone = [entry.key]
        if self._disk is not None:
            rescored = entry.key in self._rescored
            self._rescored.discard(entry.key)
            if not self._disk.has(entry.key):
                gone += self._disk.write(entry, frequency, self._leased)
            elif rescored and entry.scores is not None:
                if not self._disk.write_scores(entry.key, entry.scores):
                    # The disk copy keeps older scores: read back, they count as measured once.
                    self._score_uses.pop(entry.key, None)
                    self._score_measures.pop(entry.key, None)
        return gone

    def _forget_counts(self, keys: Iterable[str]) -> None:
        """Drop the refresh counts of those of `keys` no tier holds (a key the disk evicted
        may still be in host: read back, its counts stay)."""
        for key in keys:
            if not self._held(key):
                self._score_uses.pop(key, None)
                self._score_measures.pop(key, None)

    def _held(self, key: str) -> bool:
        return key in self._host.index or (self._disk is not None and self._disk.has(key))

    def _drop_stale(self, chunk_id: str, content: str) -> None:
        for key in self._host.index.stale_keys(chunk_id, content):
            self._host.remove(key)
            self._rescored.discard(key)
            self._score_uses.pop(key, None)
            self._score_measures.pop(key, None)
            self._host.index.counters.stale += 1
        if self._disk is not None:
            for key in self._disk.index.stale_keys(chunk_id, content):
                self._disk.remove(key)
                self._score_uses.pop(key, None)
                self._score_measures.pop(key, None)
                self._disk.index.counters.stale += 1

    def _leased(self, key: str) -> bool:
        return key in self._leases

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailableError("the chunk store is closed")


def _write_note(path: Path, fingerprint: str) -> None:
    """The folder's fingerprint, for people only: one that cannot be written (another
    user's file in a shared folder) is a warning, never a reason to stop the store."""
    try:
        path.write_text(fingerprint + "\n")
    except OSError as e:
        log.warning("chunk store: cannot write %s: %s", path, e)
