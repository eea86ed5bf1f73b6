"""Blend scores stored with a chunk's KV: merged, counted in the tiers' bytes, and kept
through the host and disk tiers and a restart; an old file without scores still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from covey.cache.chunk_store import ROOT_HASH, ChunkKV, ChunkStore

BYTES_PER_TOKEN = 2 * 2 * 1 * 4 * 4  # layers * (k, v) * kv_heads * head_dim * float32
NAN = float("nan")


def make(tokens, chunk_id=None) -> ChunkKV:
    kv = torch.randn(2, 2, 1, len(tokens), 4)  # [layers, 2, kv_heads, n, head_dim]
    return ChunkKV(chunk_id, tuple(tokens), kv, 0, ROOT_HASH)


def open_store(folder: Path | None, host_tokens: int) -> ChunkStore:
    return ChunkStore(
        host_bytes=host_tokens * BYTES_PER_TOKEN,
        cost_fn=lambda n: float(n),
        disk_dir=folder,
        disk_bytes=1 << 20,
    )


def test_scores_are_checked_counted_and_merged():
    entry = make([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"scores must be float16 \[4\]"):
        ChunkKV(None, (1, 2, 3, 4), entry.kv, 0, ROOT_HASH, torch.ones(3, dtype=torch.float16))
    assert not entry.fully_scored
    first = entry.merged_scores(1, torch.tensor([2.0, NAN, 4.0]))  # rows 1..3 measured
    assert torch.equal(first.isnan(), torch.tensor([True, False, True, False]))
    scored = ChunkKV(None, entry.token_ids, entry.kv, 0, ROOT_HASH, first)
    assert scored.nbytes == entry.nbytes + 4 * 2
    second = scored.merged_scores(0, torch.tensor([1.0, 4.0, 3.0, 2.0]))
    assert second.tolist() == [1.0, 3.0, 3.0, 3.0]  # new where unknown, else the mean
    assert ChunkKV(None, entry.token_ids, entry.kv, 0, ROOT_HASH, second).fully_scored


def test_update_replaces_the_host_entry_and_counts_its_bytes():
    s = open_store(None, host_tokens=100)
    entry = make([1, 2, 3], chunk_id="c")
    assert s.put(entry)
    before = s.stats()["host"]["bytes"]
    assert s.update_scores(entry, 0, torch.tensor([0.5, 1.0, 1.5]))
    held = s.get_any("c", [1, 2, 3])
    assert held.scores.tolist() == [0.5, 1.0, 1.5]
    assert torch.equal(held.kv, entry.kv)
    assert s.stats()["host"]["bytes"] == before + 3 * 2
    assert s.stats()["host"]["entries"] == 1
    assert not s.update_scores(make([7, 8]), 0, torch.ones(2))  # not held: dropped


def test_scores_survive_the_disk_tier_and_a_restart(tmp_path):
    a, b = make([1, 2, 3], chunk_id="a"), make([4, 5], chunk_id="b")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(a) and s.put(b)
        s.update_scores(a, 0, torch.tensor([3.0, 2.0, 1.0]))
    with open_store(tmp_path, host_tokens=100) as s:
        loaded = s.get_any("a", [1, 2, 3])  # read from disk
        assert loaded.scores.tolist() == [3.0, 2.0, 1.0]
        assert s.get_any("b", [4, 5]).scores is None  # never scored: none
        # Scores updated while disk holds an older copy reach disk on the swap-out.
        s.update_scores(loaded, 0, torch.tensor([1.0, 2.0, 3.0]))
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.get_any("a", [1, 2, 3]).scores.tolist() == [2.0, 2.0, 2.0]


def test_scores_reach_disk_when_host_evicts(tmp_path):
    a, b = make([1, 2, 3], chunk_id="a"), make([4, 5, 6], chunk_id="b")
    with open_store(tmp_path, host_tokens=4) as s:  # room for one entry
        assert s.put(a)
        assert s.update_scores(a, 0, torch.tensor([1.0, 2.0, 3.0]))
        assert s.put(b)  # evicts a to disk, with its scores
        assert s.stats()["host"]["entries"] == 1 and s.stats()["disk"]["entries"] == 1
        assert s.get_any("a", [1, 2, 3]).scores.tolist() == [1.0, 2.0, 3.0]


def test_an_old_file_without_scores_loads(tmp_path):
    """A file written before scores existed: the same format, no "scores" tensor."""
    entry = make([1, 2, 3], chunk_id="a")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(entry)
    (path,) = tmp_path.glob("*.safetensors")
    assert set(safetensors.torch.load(path.read_bytes())) == {"kv"}
    with open_store(tmp_path, host_tokens=100) as s:
        loaded = s.get_any("a", [1, 2, 3])
        assert loaded is not None and loaded.scores is None
        assert torch.equal(loaded.kv, entry.kv)
