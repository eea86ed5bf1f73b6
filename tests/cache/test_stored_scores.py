"""Blend scores stored with a chunk's KV: merged, counted in the tiers' bytes, and kept
through the host and disk tiers and a restart; an old file without scores still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from covey.cache.chunk_store import (
    ROOT_HASH,
    SCORES_REFRESH_MAX_USES,
    SCORES_REFRESH_USES,
    ChunkKV,
    ChunkStore,
)

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


def kv_file(folder: Path) -> Path:
    (path,) = folder.glob("*.safetensors")
    return path


def test_rescoring_never_rewrites_or_removes_the_kv_file(tmp_path):
    """REVIEW-blend15 M1/M2: a disk tier sized to exactly the unscored file; new scores used
    to delete the file and rewrite it whole (which then no longer fit: the KV was lost)."""
    entry = make([1, 2, 3], chunk_id="a")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(entry)
    path = kv_file(tmp_path)
    exact = ChunkStore(100 * BYTES_PER_TOKEN, float, tmp_path, path.stat().st_size)
    with exact as s:
        loaded = s.get_any("a", [1, 2, 3])
        assert s.update_scores(loaded, 0, torch.tensor([1.0, 2.0, 3.0]))
    after = kv_file(tmp_path)
    assert (after.stat().st_ino, after.stat().st_mtime_ns) == (
        path.stat().st_ino,
        path.stat().st_mtime_ns,
    )
    with open_store(tmp_path, host_tokens=100) as s:
        again = s.get_any("a", [1, 2, 3])
        assert torch.equal(again.kv, entry.kv) and again.scores.tolist() == [1.0, 2.0, 3.0]


def test_a_write_failing_midway_keeps_the_kv_and_the_old_scores(tmp_path, monkeypatch):
    entry = make([1, 2, 3], chunk_id="a")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(entry)
        s.update_scores(entry, 0, torch.tensor([3.0, 2.0, 1.0]))
    real = Path.write_bytes

    def torn(self, data):  # half the bytes, then the disk fails
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    with open_store(tmp_path, host_tokens=100) as s:
        loaded = s.get_any("a", [1, 2, 3])
        s.update_scores(loaded, 0, torch.tensor([1.0, 2.0, 3.0]))
        monkeypatch.setattr(Path, "write_bytes", torn)
        s.close()  # the swap-out's scores write fails
        monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    with open_store(tmp_path, host_tokens=100) as s:
        again = s.get_any("a", [1, 2, 3])
        assert torch.equal(again.kv, entry.kv)
        assert again.scores.tolist() == [3.0, 2.0, 1.0]  # the old scores, whole


def test_a_bad_scores_file_means_no_scores_and_the_kv_loads(tmp_path):
    """A torn scores file, a leftover temporary (a crash mid-write), or scores of the wrong
    length: the entry loads without scores; none of it drops the KV."""
    entry = make([1, 2, 3], chunk_id="a")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(entry)
        s.update_scores(entry, 0, torch.tensor([3.0, 2.0, 1.0]))
    (scores_file,) = tmp_path.glob("*.scores")
    good = scores_file.read_bytes()
    (tmp_path / f"{scores_file.name}.tmp").write_bytes(good[:10])
    scores_file.write_bytes(good[: len(good) - 3])
    with open_store(tmp_path, host_tokens=100) as s:
        assert not list(tmp_path.glob("*.tmp"))  # the unfinished write is deleted on open
        loaded = s.get_any("a", [1, 2, 3])
        assert loaded.scores is None and torch.equal(loaded.kv, entry.kv)
    scores_file.write_bytes(
        safetensors.torch.save(
            {"scores": torch.ones(5, dtype=torch.float16)},
            {"format": "covey-chunk-scores/1", "tag": ""},
        )
    )
    with open_store(tmp_path, host_tokens=100) as s:
        loaded = s.get_any("a", [1, 2, 3])
        assert loaded.scores is None and torch.equal(loaded.kv, entry.kv)


def test_scores_of_other_settings_are_not_read_back(tmp_path):
    """Scores measured under other check layers / score kind (the store's scores_tag) are
    ignored after a restart; the KV is reused."""

    def store(tag):
        return ChunkStore(100 * BYTES_PER_TOKEN, float, tmp_path, 1 << 20, scores_tag=tag)

    entry = make([1, 2, 3], chunk_id="a")
    with store("check=[8] score=deviation") as s:
        assert s.put(entry)
        s.update_scores(entry, 0, torch.tensor([3.0, 2.0, 1.0]))
    with store("check=[12] score=deviation") as s:
        loaded = s.get_any("a", [1, 2, 3])
        assert loaded.scores is None and torch.equal(loaded.kv, entry.kv)
    with store("check=[8] score=deviation") as s:
        assert s.get_any("a", [1, 2, 3]).scores.tolist() == [3.0, 2.0, 1.0]


def test_re_putting_a_chunk_keeps_its_disk_scores(tmp_path):
    entry = make([1, 2, 3], chunk_id="a")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(entry)
        s.update_scores(entry, 0, torch.tensor([3.0, 2.0, 1.0]))
    with open_store(tmp_path, host_tokens=100) as s:
        fresh = ChunkKV("a", entry.token_ids, entry.kv.clone(), 0, ROOT_HASH)  # unscored
        assert s.put(fresh)
        assert s.get_any("a", [1, 2, 3]).scores.tolist() == [3.0, 2.0, 1.0]


def test_scores_are_refreshed_after_some_uses():
    """Stored scores choose at most SCORES_REFRESH_USES blends; then a blend must measure
    them again, and a new measurement starts the count over."""
    s = open_store(None, host_tokens=100)
    entry = make([1, 2, 3], chunk_id="a")
    assert s.put(entry)
    s.update_scores(entry, 0, torch.ones(3))
    for _ in range(SCORES_REFRESH_USES):
        assert s.scores_fresh(entry)
        s.note_stored_use(entry)
    assert not s.scores_fresh(entry)
    s.update_scores(entry, 0, torch.ones(3))
    assert s.scores_fresh(entry)


def _uses_until_refresh(s: ChunkStore, entry: ChunkKV) -> int:
    n = 0
    while s.scores_fresh(entry):
        s.note_stored_use(entry)
        n += 1
    return n


def test_refresh_interval_doubles_per_measurement_up_to_a_cap():
    """Each measurement merged doubles the stored-score blends before the next one (8, 16,
    32, ...), up to SCORES_REFRESH_MAX_USES; an entry put again unscored starts over."""
    s = open_store(None, host_tokens=100)
    entry = make([1, 2, 3], chunk_id="a")
    assert s.put(entry)
    intervals = []
    for _ in range(6):
        s.update_scores(entry, 0, torch.ones(3))
        intervals.append(_uses_until_refresh(s, entry))
    assert intervals == [8, 16, 32, 64, 64, 64]
    assert (SCORES_REFRESH_USES, SCORES_REFRESH_MAX_USES) == (8, 64)
    s2 = open_store(None, host_tokens=4)  # room for one entry: b evicts a
    assert s2.put(entry)
    for _ in range(3):
        s2.update_scores(entry, 0, torch.ones(3))
    assert s2.put(make([4, 5, 6], chunk_id="b"))
    assert s2.get_any("a", [1, 2, 3]) is None
    assert s2.put(make([1, 2, 3], chunk_id="a"))  # recomputed: unscored again
    s2.update_scores(entry, 0, torch.ones(3))
    assert _uses_until_refresh(s2, entry) == SCORES_REFRESH_USES


def test_measurements_merge_as_a_running_mean():
    """Each measurement weighs 1 / (count so far + 1): after three, every one counts a
    third, not the last one half."""
    s = open_store(None, host_tokens=100)
    entry = make([1, 2, 3], chunk_id="a")
    assert s.put(entry)
    for value in (3.0, 6.0, 9.0):
        s.update_scores(entry, 0, torch.full((3,), value))
    assert s.get_any("a", [1, 2, 3]).scores.tolist() == [6.0, 6.0, 6.0]


def test_counts_go_with_an_entry_no_tier_holds_and_stay_bounded():
    s = open_store(None, host_tokens=3)  # one entry at a time, no disk
    for i in range(200):
        entry = make([i, i + 1000, i + 2000], chunk_id=f"c{i}")
        assert s.put(entry)
        s.update_scores(entry, 0, torch.ones(3))
        s.note_stored_use(entry)
    assert len(s._score_measures) <= 2 and len(s._score_uses) <= 2


def test_a_count_survives_a_trip_to_disk_but_not_a_disk_copy_without_scores(tmp_path):
    s = open_store(tmp_path, host_tokens=3)
    a = make([1, 2, 3], chunk_id="a")
    assert s.put(a)
    for _ in range(3):
        s.update_scores(a, 0, torch.ones(3))
    assert s.refresh_after(a) == 4 * SCORES_REFRESH_USES
    assert s.put(make([4, 5, 6], chunk_id="b"))  # a goes to disk, with its scores
    back = s.get_any("a", [1, 2, 3])
    assert back is not None and back.scores is not None
    assert s.refresh_after(back) == 4 * SCORES_REFRESH_USES
    assert s.put(make([7, 8, 9], chunk_id="c"))  # a to disk again
    for path in tmp_path.rglob("*scores*"):
        path.unlink()  # its scores file lost: back unscored, measured afresh
    back = s.get_any("a", [1, 2, 3])
    assert back is not None and back.scores is None
    s.update_scores(back, 0, torch.ones(3))
    assert s.refresh_after(back) == SCORES_REFRESH_USES


def _held(s: ChunkStore) -> set[str]:
    return set(s._host.index.metas) | set(s._disk.index.metas)


def test_counts_go_with_exactly_the_entries_the_disk_tier_evicts(tmp_path):
    """With a disk tier, entries leave by the disk's own evictions, which it reports: after
    every put the counts are kept for exactly the entries some tier holds (a long-running
    server reads many chunks; none of their counts may outlive them)."""
    s = ChunkStore(
        host_bytes=3 * BYTES_PER_TOKEN,
        cost_fn=lambda n: float(n),
        disk_dir=tmp_path,
        disk_bytes=4 * 3 * BYTES_PER_TOKEN,
    )
    for i in range(60):
        entry = make([i, i + 1000, i + 2000], chunk_id=f"c{i}")
        assert s.put(entry)
        s.update_scores(entry, 0, torch.ones(3))
        s.note_stored_use(entry)
        assert set(s._score_measures) == set(s._score_uses) == _held(s)
    assert s.stats()["disk"]["evictions"] > 50 and len(_held(s)) < 10


def test_an_entry_the_disk_evicts_keeps_its_counts_while_host_holds_it(tmp_path):
    """An entry read back from disk is in both tiers; the disk evicting its file must not
    take the counts of the host copy. Leases and lookups steer the victims."""
    one_file = _disk_file_bytes(tmp_path / "probe")
    host_bytes = 2 * (3 * BYTES_PER_TOKEN + 3 * 2)  # two scored entries
    s = ChunkStore(host_bytes, float, tmp_path / "d", 2 * one_file + 64)  # two files
    a, b, c, d = (make([i, i + 10, i + 20], chunk_id=n) for i, n in enumerate("abcd"))
    for entry in (a, b):
        assert s.put(entry)
        s.update_scores(entry, 0, torch.ones(3))
    with s.lease(b):
        assert s.put(c)  # a to disk
    s.update_scores(c, 0, torch.ones(3))
    with s.lease(b):
        assert s.get_any("a", a.token_ids) is not None  # a back to host, c to disk
    with s.lease(c):
        for _ in range(5):
            s.get_any("a", a.token_ids)  # host keeps a, evicts b for d ...
        assert s.put(d)  # ... and the disk, c leased, evicts a's file to take b
    assert not s._disk.has(a.key) and a.key in s._host.index
    assert s._score_measures[a.key] == 1
    assert set(s._score_measures) == _held(s) - {d.key} == {a.key, b.key, c.key}


def test_an_unreadable_disk_file_takes_its_counts(tmp_path):
    s = open_store(tmp_path, host_tokens=3)
    a, b = make([1, 2, 3], chunk_id="a"), make([4, 5, 6], chunk_id="b")
    assert s.put(a)
    s.update_scores(a, 0, torch.ones(3))
    assert s.put(b)  # a to disk, its counts kept
    assert a.key in s._score_measures
    (tmp_path / f"{a.key}.safetensors").write_bytes(b"garbage")
    assert s.get_any("a", a.token_ids) is None  # dropped on read
    assert a.key not in s._score_measures


def test_a_blend_of_an_entry_no_tier_holds_is_not_counted():
    s = open_store(None, host_tokens=3)
    a, b = make([1, 2, 3], chunk_id="a"), make([4, 5, 6], chunk_id="b")
    assert s.put(a) and s.put(b)  # b evicts a: no tier holds it
    s.note_stored_use(a)
    assert a.key not in s._score_uses


def _disk_file_bytes(folder: Path) -> int:
    with open_store(folder, host_tokens=100) as s:
        s.put(make([0, 1, 2]))
    return kv_file(folder).stat().st_size


@pytest.mark.parametrize("back_by", ["get_any", "put"])
def test_an_entry_back_from_disk_keeps_its_counts_when_its_file_makes_room(tmp_path, back_by):
    """Host and disk hold one entry each. Reading `a` back evicts `b` from host, and
    writing `b` to disk evicts `a`'s own file: `a` is in no tier for that moment, then in
    host, and its counts must survive it."""
    one_file = _disk_file_bytes(tmp_path / "probe")
    s = ChunkStore(3 * BYTES_PER_TOKEN + 3 * 2, float, tmp_path / "d", one_file + 64)
    a, b = make([1, 2, 3], chunk_id="a"), make([4, 5, 6], chunk_id="b")
    assert s.put(a)
    s.update_scores(a, 0, torch.ones(3))
    s.update_scores(a, 0, torch.ones(3))
    s.note_stored_use(a)
    assert s.put(b)  # a to disk, with its counts
    assert s._disk.has(a.key) and s.refresh_after(a) == 2 * SCORES_REFRESH_USES
    if back_by == "get_any":
        assert s.get_any("a", a.token_ids) is not None
    else:
        assert s.put(a)
    assert a.key in s._host.index and not s._disk.has(a.key) and s._disk.has(b.key)
    assert s.refresh_after(a) == 2 * SCORES_REFRESH_USES
    assert s._score_uses[a.key] == 1
    assert set(s._score_measures) == set(s._score_uses) == {a.key}


def test_scores_that_fail_to_reach_disk_take_their_counts(tmp_path, monkeypatch):
    """The disk copy keeps older scores when the new ones cannot be written: read back, they
    count as one measurement, not as the measurements only the lost scores had."""
    s = ChunkStore(3 * BYTES_PER_TOKEN + 3 * 2, float, tmp_path, 1 << 20)
    a = make([1, 2, 3], chunk_id="a")
    assert s.put(a)
    s.update_scores(a, 0, torch.tensor([3.0, 2.0, 1.0]))
    assert s.put(make([4, 5, 6], chunk_id="b"))  # a to disk, with its scores
    assert s.get_any("a", a.token_ids) is not None
    s.update_scores(a, 0, torch.tensor([1.0, 2.0, 3.0]))
    s.note_stored_use(a)
    assert s.refresh_after(a) == 2 * SCORES_REFRESH_USES
    real = Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    assert s.put(make([7, 8, 9], chunk_id="c"))  # a's disk copy is there: only its scores
    monkeypatch.undo()
    assert a.key not in s._score_measures and a.key not in s._score_uses
    back = s.get_any("a", a.token_ids)
    assert back.scores.tolist() == [3.0, 2.0, 1.0]  # the first measurement's
    assert s.refresh_after(back) == SCORES_REFRESH_USES
