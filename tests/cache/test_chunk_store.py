from __future__ import annotations

import threading

import pytest
import torch

from covey.cache.chunk_store import (
    ROOT_HASH,
    STANDALONE_PREFIX,
    ChunkKV,
    ChunkStore,
    chain_hash,
    content_hash,
)
from covey.errors import ConfigError, EngineUnavailableError

BYTES_PER_TOKEN = 2 * 2 * 1 * 4 * 4  # layers * (k, v) * kv_heads * head_dim * float32


def make(tokens, chunk_id=None, context=ROOT_HASH, start=0, dtype=torch.float32) -> ChunkKV:
    n = len(tokens)
    kv = torch.randn(2, 2, 1, n, 4).to(dtype)  # [layers, 2, kv_heads, n, head_dim]
    return ChunkKV(chunk_id, tuple(tokens), kv, start, context)


def store(host_tokens: int, cost_fn=lambda n: float(n)) -> ChunkStore:
    return ChunkStore(host_bytes=host_tokens * BYTES_PER_TOKEN, cost_fn=cost_fn)


def test_hashes_are_stable_and_tell_spans_apart():
    # pinned: a file written by one run must be found by the next, on any machine
    assert content_hash([1, 2, 3]) == "b30a3c159d7e8193559a42a84f1fcae1"
    assert chain_hash(ROOT_HASH, (1, 2, 3)) == "182ab60a45c8d2dcc8c32643634ad19b"
    assert content_hash([1, 2, 3]) != content_hash([3, 2, 1])
    assert content_hash([1, 2, 3]) != content_hash([1, 2, 3, 0])
    sys_hash = chain_hash(ROOT_HASH, [7, 8])
    assert chain_hash(sys_hash, [1, 2, 3]) != chain_hash(ROOT_HASH, [1, 2, 3])
    assert chain_hash(ROOT_HASH, [1, 2, 3]) != content_hash([1, 2, 3])
    with pytest.raises(ValueError, match="token ids must fit in int32"):
        content_hash([1 << 40])


def test_chunk_kv_checks_its_shape():
    with pytest.raises(ValueError, match=r"n = 3 tokens, got shape \[2, 2, 1, 2, 4\]"):
        ChunkKV("c", (1, 2, 3), torch.zeros(2, 2, 1, 2, 4), 0, ROOT_HASH)
    with pytest.raises(ValueError, match="at least one token"):
        ChunkKV("c", (), torch.zeros(2, 2, 1, 0, 4), 0, ROOT_HASH)
    with pytest.raises(ValueError, match="start_position must be >= 0"):
        ChunkKV("c", (1,), torch.zeros(2, 2, 1, 1, 4), -1, ROOT_HASH)
    entry = ChunkKV("c", [1, 2], torch.zeros(2, 2, 1, 2, 4), 0, ROOT_HASH)
    assert entry.token_ids == (1, 2) and entry.nbytes == 2 * BYTES_PER_TOKEN


def test_exact_lookup_needs_same_tokens_after_same_context():
    s = store(100)
    ctx = chain_hash(ROOT_HASH, [9, 9, 9])
    entry = make([1, 2, 3], chunk_id="c1", context=ctx, start=3)
    assert s.put(entry)
    hit = s.get_exact(ctx, [1, 2, 3])
    assert hit is not None and torch.equal(hit.kv, entry.kv) and hit.start_position == 3
    assert s.get_exact(ROOT_HASH, [1, 2, 3]) is None  # other context
    assert s.get_exact(ctx, [1, 2, 4]) is None  # other tokens
    assert s.stats()["host"] == {
        "hits": 1, "misses": 2, "evictions": 0, "bytes": 3 * BYTES_PER_TOKEN,
        "entries": 1, "stale": 0,
    }


def test_any_lookup_finds_the_tokens_after_any_context():
    s = store(100)
    standalone = make([5, 6], chunk_id="c2", context=STANDALONE_PREFIX + "c2")
    assert s.put(standalone)
    hit = s.get_any("c2", [5, 6])
    assert hit is not None and torch.equal(hit.kv, standalone.kv)
    assert s.get_any(None, [5, 6]) is not None  # the id is advisory
    assert s.get_any("c2", [5, 7]) is None
    assert s.get_exact(ROOT_HASH, [5, 6]) is None  # standalone KV is never exact


def test_changed_chunk_text_is_a_stale_miss_and_never_returns_old_kv():
    s = store(100)
    old = make([1, 2, 3], chunk_id="doc-1")
    s.put(old)
    assert s.get_any("doc-1", [1, 2, 4]) is None
    stats = s.stats()["host"]
    assert stats["stale"] == 1 and stats["misses"] == 1 and stats["entries"] == 0
    # the new text is stored and found; the old text's KV is gone for good
    new = make([1, 2, 4], chunk_id="doc-1")
    assert s.put(new)
    assert s.get_any("doc-1", [1, 2, 4]).kv is not old.kv
    assert s.get_exact(ROOT_HASH, [1, 2, 3]) is None
    # a put of changed text drops the old entries too (the exact path passes no id)
    s.put(make([1, 2, 5], chunk_id="doc-1"))
    assert s.get_exact(ROOT_HASH, [1, 2, 4]) is None
    assert s.stats()["host"]["stale"] == 2


def test_host_tier_respects_its_capacity():
    s = store(10)
    for i in range(8):
        assert s.put(make([i, i + 100, i + 200]))  # 3 tokens each: 3 fit in 10
        assert s.stats()["host"]["bytes"] <= 10 * BYTES_PER_TOKEN
    stats = s.stats()["host"]
    assert stats["entries"] == 3 and stats["evictions"] == 5
    assert not s.put(make(list(range(11))))  # larger than the tier: refused
    assert s.stats()["host"]["entries"] == 3  # and nothing was evicted for it


def test_store_evicts_by_pgdsf_value_not_by_age():
    """cost n**2 makes a long chunk worth more per byte than a short one, until the short
    one is used often enough. Priorities in units of 1/B, B = BYTES_PER_TOKEN."""
    s = store(11, cost_fn=lambda n: float(n * n))
    s.put(make(list(range(8))))  # long: 0 + 1 * 64 / 8B = 8/B
    s.put(make([100, 101]))  # short: 0 + 1 * 4 / 2B = 2/B
    s.put(make([200, 201]))  # needs room: the short one (2/B) goes, though the long is older
    assert s.contains_exact(ROOT_HASH, range(8))
    assert not s.contains_exact(ROOT_HASH, [100, 101])
    for _ in range(3):  # clock 2/B; frequency 4: 2/B + 4 * 2/B = 10/B > 8/B
        s.get_exact(ROOT_HASH, [200, 201])
    s.put(make([300, 301]))
    assert not s.contains_exact(ROOT_HASH, range(8))
    assert s.contains_exact(ROOT_HASH, [200, 201]) and s.contains_exact(ROOT_HASH, [300, 301])
    assert s.stats()["host"]["evictions"] == 2


def test_leased_entries_survive_eviction_pressure():
    s = store(6)
    held = make([1, 2, 3])
    s.put(held)
    with s.lease(s.get_exact(ROOT_HASH, [1, 2, 3])):
        for i in range(5):
            s.put(make([10 + i, 20 + i, 30 + i]))
        assert s.contains_exact(ROOT_HASH, [1, 2, 3])
        assert not s.put(make(list(range(40, 44))))  # needs the leased room: refused
    assert s.put(make(list(range(40, 44))))  # released: now it may go
    assert not s.contains_exact(ROOT_HASH, [1, 2, 3])
    with pytest.raises(ValueError, match="this entry is not leased"):
        s.release(held)


def test_nested_leases_count():
    s = store(3)
    held = make([1, 2, 3])
    s.put(held)
    s.acquire(held)
    s.acquire(held)
    s.release(held)
    assert not s.put(make([4, 5, 6]))
    s.release(held)
    assert s.put(make([4, 5, 6]))


def test_planning_lookups_move_no_counter():
    s = store(10)
    s.put(make([1, 2], context="ctx"))
    before = s.stats()
    assert s.contains_any([1, 2]) and not s.contains_any([2, 1])
    assert s.contains_exact("ctx", [1, 2]) and not s.contains_exact(ROOT_HASH, [1, 2])
    assert s.stats() == before


def test_put_of_a_held_entry_keeps_one_copy_and_views_are_compacted():
    s = store(100)
    big = torch.randn(2, 2, 1, 50, 4)
    view = ChunkKV(None, (1, 2), big[:, :, :, :2], 0, ROOT_HASH)  # a view into 50 tokens
    assert s.put(view) and s.put(view)
    kept = s.get_exact(ROOT_HASH, [1, 2])
    assert kept.kv.untyped_storage().nbytes() == 2 * BYTES_PER_TOKEN
    assert torch.equal(kept.kv, view.kv)
    assert s.stats()["host"]["entries"] == 1


def test_bad_configuration_and_closed_store():
    with pytest.raises(ConfigError, match="chunk_store_bytes must be >= 0, got -1"):
        ChunkStore(host_bytes=-1, cost_fn=float)
    with pytest.raises(ConfigError, match="chunk_store_disk_bytes must be > 0, got 0"):
        ChunkStore(host_bytes=1, cost_fn=float, disk_bytes=0)
    s = store(10)
    s.close()
    s.close()
    with pytest.raises(EngineUnavailableError, match="the chunk store is closed"):
        s.get_exact(ROOT_HASH, [1])
    with pytest.raises(EngineUnavailableError, match="the chunk store is closed"):
        s.put(make([1]))
    assert s.stats()["disk"]["entries"] == 0  # no disk tier: zeros, same shape


def test_threads_interleaving_puts_and_lookups_keep_the_books_straight():
    """The engine is single-threaded; the lock is for a warm-up on another thread."""
    s = store(20)
    errors = []

    def worker(seed: int) -> None:
        try:
            for i in range(60):
                tokens = [seed, i % 7, 1000]
                if s.get_exact(ROOT_HASH, tokens) is None:
                    s.put(make(tokens, chunk_id=f"{seed}-{i % 7}"))
                with s.lease(make([seed])):
                    s.contains_any(tokens)
        except Exception as e:  # surfaced below, with the thread's own error
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    host = s.stats()["host"]
    assert host["bytes"] == host["entries"] * 3 * BYTES_PER_TOKEN <= 20 * BYTES_PER_TOKEN
    assert host["hits"] + host["misses"] == 4 * 60
