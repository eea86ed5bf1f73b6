from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from covey.cache.chunk_store import ROOT_HASH, ChunkKV, ChunkStore
from covey.cache.disk_tier import DiskTier, file_in_the_way
from covey.errors import ConfigError

BYTES_PER_TOKEN = 2 * 2 * 1 * 4 * 4  # layers * (k, v) * kv_heads * head_dim * float32


def make(tokens, chunk_id=None, dtype=torch.float32) -> ChunkKV:
    kv = torch.randn(2, 2, 1, len(tokens), 4).to(dtype)  # [layers, 2, kv_heads, n, head_dim]
    return ChunkKV(chunk_id, tuple(tokens), kv, 0, ROOT_HASH)


def open_store(folder: Path, host_tokens: int, disk_bytes: int = 1 << 20) -> ChunkStore:
    return ChunkStore(
        host_bytes=host_tokens * BYTES_PER_TOKEN,
        cost_fn=lambda n: float(n),
        disk_dir=folder,
        disk_bytes=disk_bytes,
    )


def entry_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_disk_survives_a_restart(tmp_path):
    a, b = make([1, 2, 3], chunk_id="a", dtype=torch.bfloat16), make([4, 5], chunk_id="b")
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.put(a) and s.put(b)
    assert len(entry_files(tmp_path)) == 2  # close wrote the host entries out
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.stats()["disk"]["entries"] == 2
        hit = s.get_exact(ROOT_HASH, [1, 2, 3])
        assert hit.kv.dtype == torch.bfloat16 and torch.equal(hit.kv, a.kv)
        assert hit.chunk_id == "a" and hit.context_hash == ROOT_HASH
        assert torch.equal(s.get_any("b", [4, 5]).kv, b.kv)
        assert s.stats()["disk"]["hits"] == 2 and s.stats()["host"]["misses"] == 2
        assert s.get_exact(ROOT_HASH, [1, 2, 3]) is not None  # promoted: a host hit now
        assert s.stats()["host"]["hits"] == 1 and s.stats()["disk"]["hits"] == 2


def test_swap_out_only_once(tmp_path):
    s = open_store(tmp_path, host_tokens=3)  # one 3-token entry fits in host
    s.put(make([1, 2, 3]))
    s.put(make([4, 5, 6]))  # evicts [1, 2, 3] to disk
    [first] = entry_files(tmp_path)
    written = first.stat()
    assert s.get_exact(ROOT_HASH, [1, 2, 3]) is not None  # disk hit, promoted; [4..6] out
    assert len(entry_files(tmp_path)) == 2
    s.put(make([7, 8, 9]))  # evicts [1, 2, 3] from host again: disk holds it already
    again = first.stat()
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert s.stats()["disk"]["entries"] == 2 and s.stats()["host"]["evictions"] == 3
    s.close()


def test_disk_tier_respects_its_capacity_with_pgdsf(tmp_path):
    probe = open_store(tmp_path / "probe", host_tokens=0)
    file_bytes = _file_bytes(tmp_path / "probe", make([0, 1, 2]))
    probe.close()
    s = open_store(tmp_path / "d", host_tokens=3, disk_bytes=int(2.5 * file_bytes))
    s.put(make([1, 2, 3]))
    for _ in range(3):
        s.get_exact(ROOT_HASH, [1, 2, 3])  # frequently used: worth keeping
    for i in range(6):  # each put pushes the previous host entry to disk
        s.put(make([10 + i, 20 + i, 30 + i]))
        disk = s.stats()["disk"]
        assert disk["bytes"] <= 2.5 * file_bytes and disk["entries"] <= 2
    assert s.stats()["disk"]["evictions"] == 4  # 6 written ([1, 2, 3], then 5 of 6), 2 kept
    assert len(entry_files(tmp_path / "d")) == s.stats()["disk"]["entries"] == 2
    assert s.contains_exact(ROOT_HASH, [1, 2, 3])  # PGDSF kept the frequent one on disk
    s.close()


def test_a_write_reports_the_keys_it_evicted(tmp_path, monkeypatch):
    """The store forgets what it keeps about an entry by these keys; a write that fails
    after evicting still reports them (the files are gone), one that cannot fit evicts
    nothing."""
    entries = [make([i, i + 10, i + 20]) for i in range(4)]
    file_bytes = _file_bytes(tmp_path / "probe", entries[0])
    disk = DiskTier(tmp_path / "d", 2 * file_bytes, float)
    assert disk.write(entries[0], 1, never) == ()
    assert disk.write(entries[1], 5, never) == ()
    assert disk.write(entries[2], 1, never) == (entries[0].key,)
    assert [disk.has(e.key) for e in entries[:3]] == [False, True, True]
    too_big = make(range(100))
    assert disk.write(too_big, 1, never) == () and not disk.has(too_big.key)
    assert disk.write(entries[3], 1, lambda _key: True) == () and not disk.has(entries[3].key)
    monkeypatch.setattr(Path, "write_bytes", _disk_full)
    assert disk.write(entries[3], 1, never) == (entries[2].key,)
    assert [disk.has(e.key) for e in entries] == [False, True, False, False]
    assert len(entry_files(tmp_path / "d")) == 1


def never(_key: str) -> bool:
    return False


def _disk_full(_path: Path, _data: bytes) -> int:
    raise OSError(28, "No space left on device")


def _file_bytes(folder: Path, entry: ChunkKV) -> int:
    with open_store(folder, host_tokens=10) as s:
        s.put(entry)
    [path] = entry_files(folder)
    return path.stat().st_size


def test_frequency_survives_a_restart_and_a_smaller_capacity_shrinks(tmp_path):
    with open_store(tmp_path, host_tokens=100) as s:
        s.put(make([1, 2, 3]))
        for _ in range(4):
            s.get_exact(ROOT_HASH, [1, 2, 3])
        s.put(make([4, 5, 6]))
    one_file = entry_files(tmp_path)[0].stat().st_size
    with open_store(tmp_path, host_tokens=100, disk_bytes=one_file) as s:
        assert s.stats()["disk"]["entries"] == 1 and s.stats()["disk"]["evictions"] == 1
        assert s.contains_exact(ROOT_HASH, [1, 2, 3])  # frequency 5 beat frequency 1
    assert len(entry_files(tmp_path)) == 1


def test_garbage_files_are_skipped_with_a_warning_and_removed(tmp_path, caplog):
    with open_store(tmp_path, host_tokens=100) as s:
        s.put(make([1, 2, 3]))
        s.put(make([4, 5, 6]))
    good, torn = entry_files(tmp_path)
    torn.write_bytes(torn.read_bytes()[:-10])  # a write cut short
    (tmp_path / ("0" * 32 + ".safetensors")).write_bytes(b"not a safetensors file")
    renamed = tmp_path / ("f" * 32 + ".safetensors")  # a valid file under the wrong name
    renamed.write_bytes(good.read_bytes())
    (tmp_path / ("e" * 32 + ".tmp")).write_bytes(b"half")  # an unfinished write
    (tmp_path / "notes.txt").write_text("not ours")
    with caplog.at_level(logging.WARNING, logger="covey.cache.disk_tier"):
        s = open_store(tmp_path, host_tokens=100)
    assert s.stats()["disk"]["entries"] == 1
    assert entry_files(tmp_path) == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, "notes.txt"])
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "unfinished write" in messages and "not fully covered" in messages
    assert "does not match the file name" in messages and "header too large" in messages
    assert s.get_exact(ROOT_HASH, [1, 2, 3]) is not None
    s.close()


def test_a_file_broken_after_open_is_a_miss_not_a_crash(tmp_path, caplog):
    with open_store(tmp_path, host_tokens=100) as s:
        s.put(make([1, 2, 3]))
    s = open_store(tmp_path, host_tokens=100)
    [path] = entry_files(tmp_path)
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="covey.cache.disk_tier"):
        assert s.get_exact(ROOT_HASH, [1, 2, 3]) is None
    assert "dropping unreadable" in caplog.text
    assert s.stats()["disk"]["entries"] == 0 and s.stats()["disk"]["misses"] == 1
    assert not path.exists()
    s.close()


def test_stale_chunk_is_dropped_from_disk_too(tmp_path):
    with open_store(tmp_path, host_tokens=100) as s:
        s.put(make([1, 2, 3], chunk_id="doc"))
    with open_store(tmp_path, host_tokens=100) as s:
        assert s.get_any("doc", [1, 2, 9]) is None
        assert s.stats()["disk"]["stale"] == 1
        assert entry_files(tmp_path) == []


def test_unusable_store_dir_is_a_config_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="chunk_store_dir .*file' is a file, not a folder"):
        open_store(not_a_dir, host_tokens=1)
    with pytest.raises(ConfigError, match="kv': .*file' is a file, not a folder"):
        open_store(not_a_dir / "kv", host_tokens=1)
    if os.geteuid() == 0:
        pytest.skip("root can write to a read-only folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="is not readable and writable"):
        open_store(locked, host_tokens=1)


def test_another_fingerprint_never_sees_the_old_models_kv(tmp_path):
    def opened(fingerprint: str) -> ChunkStore:
        return ChunkStore(1 << 20, float, disk_dir=tmp_path, fingerprint=fingerprint)

    with opened("SmolLM2-135M/float32") as s:
        s.put(make([1, 2, 3]))
    with opened("other-model/bfloat16") as s:
        assert s.get_exact(ROOT_HASH, [1, 2, 3]) is None
        assert s.stats()["disk"]["entries"] == 0
    with opened("SmolLM2-135M/float32") as s:
        assert s.get_exact(ROOT_HASH, [1, 2, 3]) is not None
    texts = sorted(p.read_text() for p in tmp_path.glob("kv-*/fingerprint.txt"))
    assert texts == ["SmolLM2-135M/float32\n", "other-model/bfloat16\n"]


def test_folders_named_like_entries_are_left_alone_with_one_warning(tmp_path, caplog):
    """Not ours to delete, and never a traceback: the store opens and works around them."""
    for name in ["0" * 32 + ".safetensors", "e" * 32 + ".tmp", "f" * 32 + ".scores"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "inside").write_text("x")
    with caplog.at_level(logging.WARNING, logger="covey.cache.disk_tier"):
        with open_store(tmp_path, host_tokens=100) as s:
            s.put(make([1, 2, 3]))  # written to disk at close
        with open_store(tmp_path, host_tokens=100) as s:
            assert s.stats()["disk"]["entries"] == 1
            assert s.get_exact(ROOT_HASH, [1, 2, 3]) is not None
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3
    left_out = [r.getMessage() for r in caplog.records if "not deletable" in r.getMessage()]
    assert len(left_out) == 6 and all("Is a directory" in m for m in left_out)  # 3 per open


def test_files_that_cannot_be_deleted_are_left_out_of_the_index(tmp_path, monkeypatch, caplog):
    """Another user's files in a shared sticky folder: unreadable ones are skipped at open,
    an evicted one leaves the index, each with one warning, and the store keeps working."""
    entries = [make([i, i + 10, i + 20]) for i in range(4)]
    file_bytes = _file_bytes(tmp_path / "probe", entries[0])
    folder = tmp_path / "d"
    foreign = folder / ("0" * 32 + ".safetensors")
    DiskTier(folder, 2 * file_bytes, float)
    foreign.write_bytes(b"another user's file")
    kept = {foreign, folder / f"{entries[0].key}.safetensors"}
    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path in kept:
            raise PermissionError(1, "Operation not permitted", str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="covey.cache.disk_tier"):
        disk = DiskTier(folder, 2 * file_bytes, float)
        assert disk.write(entries[0], 1, never) == ()
        assert disk.write(entries[1], 5, never) == ()
        assert disk.write(entries[2], 1, never) == (entries[0].key,)  # cannot delete it
        assert [disk.has(e.key) for e in entries[:3]] == [False, True, True]
        assert disk.write(entries[0], 1, never) == (entries[2].key,)
        assert disk.write(entries[3], 1, never) == (entries[0].key,)  # again: no new warning
        assert [disk.has(e.key) for e in entries] == [False, True, False, True]
        reopened = DiskTier(folder, 2 * file_bytes, float)
    assert foreign.exists() and (folder / f"{entries[0].key}.safetensors").exists()
    messages = [r.getMessage() for r in caplog.records if "not deletable" in r.getMessage()]
    assert len(messages) == 3  # the foreign file at each open, the evicted entry once
    assert sum("header too large" in m for m in messages) == 2
    assert not reopened.has(foreign.name.removesuffix(".safetensors"))
    # The evicted entry that stayed still reads: valid KV, indexed again at the next open,
    # which then evicts over the capacity as usual (here another entry).
    assert reopened.has(entries[0].key)
    assert sum(reopened.has(e.key) for e in entries) == 2


def test_a_failed_write_does_not_hide_a_later_failed_delete(tmp_path, monkeypatch, caplog):
    """Warnings are once per path and kind of failure, not once per path."""
    disk = DiskTier(tmp_path / "d", 1 << 20, float)
    path = tmp_path / "d" / "x.safetensors"

    def refuse(p: Path, missing_ok: bool = False) -> None:
        raise PermissionError(1, "Operation not permitted", str(p))

    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level(logging.WARNING, logger="covey.cache.disk_tier"):
        disk._warn_once(path, "write", f"chunk store: cannot write {path}: disk full")
        disk._delete(path)
        disk._delete(path)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "not deletable" in messages[1]


def test_a_parent_that_cannot_be_searched_is_no_traceback(tmp_path, monkeypatch):
    """Path.exists raises PermissionError under a folder the user cannot search (Python
    3.11); the check for a file in the way must not, so mkdir says what is wrong."""
    (tmp_path / "a-file").write_text("x")
    assert file_in_the_way(tmp_path / "a-file" / "kv") == tmp_path / "a-file"
    assert file_in_the_way(tmp_path / "new" / "kv") is None
    secret = tmp_path / "secret"
    real_stat = os.stat

    def stat(p, *args, **kwargs):
        if str(p).startswith(str(secret)):
            raise PermissionError(13, "Permission denied", str(p))
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert file_in_the_way(secret / "kv") is None


def test_an_undeletable_fingerprint_note_does_not_stop_the_store(tmp_path, caplog):
    with ChunkStore(1 << 20, float, disk_dir=tmp_path, fingerprint="m") as s:
        s.put(make([1, 2, 3]))
    [note] = tmp_path.glob("kv-*/fingerprint.txt")
    note.unlink()
    note.mkdir()  # stands for another user's file in a shared folder
    with caplog.at_level(logging.WARNING, logger="covey.cache.chunk_store"):
        with ChunkStore(1 << 20, float, disk_dir=tmp_path, fingerprint="m") as s:
            assert s.get_exact(ROOT_HASH, [1, 2, 3]) is not None
    assert "fingerprint.txt" in caplog.text
