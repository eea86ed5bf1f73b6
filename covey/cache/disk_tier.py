"""The chunk store's disk tier: one safetensors file per entry, so a restarted server keeps
its chunk KV.

A file is named by its entry key and holds the KV plus, in its header, everything the index
needs (tokens, context hash, start position, frequency at write time), so opening a folder
rebuilds the index from headers alone without reading any KV. Files are written to a
temporary name and moved into place with os.replace, so a crash leaves either the old state
or the new file, plus at most a leftover temporary that the next open deletes. Anything
named like an entry that does not parse (torn, truncated, foreign) is skipped with a warning
and deleted: it is a cache, and a bad file must never stop the server. What cannot be deleted
(another user's file in a shared folder, a folder named like an entry) stays where it is, out
of the index, with one warning; an evicted entry that still reads is valid KV, so the next
open indexes it again (and evicts over the capacity as usual). KV writes are not fsynced: a
power cut can tear a file, which the next open then drops.

Blend scores live beside the KV, in a small file of their own (`<key>.scores`, 2 bytes a
token), so new scores never rewrite the KV (swap out once still holds) and never put it at
risk: the scores file is replaced atomically and fsynced, and a missing, torn or foreign
one (another `scores_tag`: scores measured under other check layers or another score kind)
only means "no scores"; the KV still loads. Scores files are not counted in the capacity.

One process per folder: two stores writing one folder are not coordinated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from covey.atomic_files import replace_atomically
from covey.cache.chunk_kv import ChunkKV, content_hash, entry_key
from covey.cache.tier_index import EntryMeta, TierIndex
from covey.errors import ConfigError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
SCORES_SUFFIX = ".scores"
FORMAT = "covey-chunk-kv/1"
SCORES_FORMAT = "covey-chunk-scores/1"


class DiskTier:
    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        cost_fn: Callable[[int], float],
        scores_tag: str = "",
    ) -> None:
        """`scores_tag`: the settings the blend scores are measured under; a scores file
        written under another tag is ignored (and replaced by the next write)."""
        self.dir = _usable_dir(Path(directory).expanduser())
        self.index = TierIndex(capacity_bytes)
        self._cost_fn = cost_fn
        self._scores_tag = scores_tag
        self._warned: set[tuple[Path, str]] = set()
        self._scan()

    def has(self, key: str) -> bool:
        return key in self.index

    def frequency(self, key: str) -> int:
        return self.index.policy.frequency(key)

    def touch(self, key: str) -> None:
        self.index.policy.touch(key)

    def load(self, key: str) -> ChunkKV | None:
        """The entry's KV read back, with its scores when a good scores file holds some;
        None (and the file dropped) when the KV no longer reads."""
        meta = self.index.metas[key]
        path = self._path(key)
        try:
            tensors = safetensors.torch.load(path.read_bytes())
            entry = ChunkKV(
                chunk_id=meta.chunk_id,
                token_ids=meta.token_ids,
                kv=tensors["kv"],
                start_position=meta.start_position,
                context_hash=meta.context_hash,
            )
        except Exception as e:  # a cache file must never fail a request
            log.warning("chunk store: dropping unreadable %s: %s", path, e)
            self.remove(key)
            return None
        scores = self.load_scores(key)
        return entry if scores is None else replace(entry, scores=scores)

    def load_scores(self, key: str) -> torch.Tensor | None:
        """The entry's stored blend scores ([n] float16); None when there are none or the
        scores file is torn, of another tag or the wrong shape (never an error)."""
        path = self._scores_path(key)
        if not path.exists():
            return None
        try:
            n = len(self.index.metas[key].token_ids)
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != SCORES_FORMAT:
                    raise ValueError(f"not a {SCORES_FORMAT} file")
                if header.get("tag") != self._scores_tag:
                    return None  # measured under other settings: not ours to use
                scores = f.get_tensor("scores")
            if tuple(scores.shape) != (n,) or scores.dtype != torch.float16:
                raise ValueError(f"scores {scores.dtype} {list(scores.shape)}, want [{n}]")
            return scores
        except Exception as e:
            log.warning("chunk store: ignoring unreadable scores %s: %s", path, e)
            return None

    def write_scores(self, key: str, scores: torch.Tensor) -> bool:
        """Replace the entry's scores file (temporary file, fsync, rename): a crash leaves the
        old scores or the new ones, and never touches the KV; False when the write fails."""
        blob = safetensors.torch.save(
            {"scores": scores.to("cpu", torch.float16).contiguous()},
            {"format": SCORES_FORMAT, "tag": self._scores_tag},
        )
        path = self._scores_path(key)
        tmp = self.dir / f"{key}{SCORES_SUFFIX}{TMP_SUFFIX}"
        try:
            replace_atomically(path, lambda t: t.write_bytes(blob), tmp, durable=True)
        except OSError as e:
            self._warn_once(path, "write", f"chunk store: cannot write {path}: {e}")
            return False
        return True

    def write(
        self, entry: ChunkKV, frequency: int, protected: Callable[[str], bool]
    ) -> tuple[str, ...]:
        """Store `entry` (and its scores, in their own file), evicting by PGDSF to make
        room; returns the keys evicted, so the caller can forget what it keeps about entries
        no tier holds any more. Not stored (`has` says so) when it cannot fit (larger than
        the tier, or the room is held by `protected` entries; nothing is evicted then) or
        the KV write fails (the evictions before it stand, and are returned)."""
        blob = safetensors.torch.save({"kv": entry.kv.contiguous()}, _header(entry, frequency))
        meta = replace(EntryMeta.of(entry), nbytes=len(blob))  # bytes on disk
        if not self.index.fits(meta.nbytes, protected):
            return ()
        evicted: list[str] = []
        while self.index.bytes + meta.nbytes > self.index.capacity:
            victim = self.index.pop_victim(protected)
            assert victim is not None  # fits() said the unprotected entries make room
            evicted.append(victim[0].key)
            self._unlink(victim[0].key)
        tmp = self.dir / f"{meta.key}{TMP_SUFFIX}"
        try:
            replace_atomically(self._path(meta.key), lambda t: t.write_bytes(blob), tmp)
        except OSError as e:
            path = self._path(meta.key)
            self._warn_once(path, "write", f"chunk store: cannot write {path}: {e}")
            return tuple(evicted)
        self.index.add(meta, self._cost_fn(len(meta.token_ids)), frequency)
        if entry.scores is not None:
            self.write_scores(meta.key, entry.scores)
        else:
            self._delete(self._scores_path(meta.key))
        return tuple(evicted)

    def remove(self, key: str) -> None:
        self.index.remove(key)
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        self._delete(self._path(key))
        self._delete(self._scores_path(key))

    def _delete(self, path: Path, why: str = "") -> None:
        """Delete a file the tier no longer uses, saying `why` when it is a bad file. One it
        cannot delete is left in place (the caller has left it out of the index): a cache
        must never fail the server over a file. The next open skips it again if it cannot
        read it, and indexes it again if it can (an evicted entry is valid KV)."""
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            reason = f" ({why})" if why else ""
            self._warn_once(
                path, "delete", f"chunk store: leaving out {path}{reason}, not deletable: {e}"
            )
            return
        if why:
            log.warning("chunk store: deleted %s: %s", path, why)

    def _warn_once(self, path: Path, kind: str, message: str) -> None:
        """One warning per path and `kind` of failure ("write", "delete"): an undeletable or
        unwritable file would otherwise warn at every eviction or write of its key, and a
        failed write must not hide a later failed delete."""
        if (path, kind) not in self._warned:
            self._warned.add((path, kind))
            log.warning("%s", message)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def _scores_path(self, key: str) -> Path:
        return self.dir / f"{key}{SCORES_SUFFIX}"

    def _scan(self) -> None:
        """Rebuild the index from the folder's file headers, dropping what does not parse,
        then shrink to the capacity (which may have been lowered since)."""
        for path in sorted(self.dir.iterdir()):
            if path.name.endswith(TMP_SUFFIX):
                self._delete(path, "an unfinished write")
            elif path.name.endswith(SUFFIX):
                try:
                    meta, frequency = _read_header(path)
                except Exception as e:
                    self._delete(path, f"unreadable: {e}")
                    continue
                self.index.add(meta, self._cost_fn(len(meta.token_ids)), frequency)
        for path in self.dir.glob(f"*{SCORES_SUFFIX}"):
            if path.name.removesuffix(SCORES_SUFFIX) not in self.index:
                self._delete(path)  # its KV is gone
        while self.index.bytes > self.index.capacity:
            victim = self.index.pop_victim(lambda _key: False)
            assert victim is not None
            self._unlink(victim[0].key)


def file_in_the_way(path: Path) -> Path | None:
    """The file at `path` or at the nearest of its parents that exists, when that is not a
    folder (mkdir would say only "File exists" or "Not a directory"); None otherwise. A
    parent that cannot be searched counts as absent (os.path.exists is False on any
    OSError, where Path.exists raises PermissionError): mkdir then says what is wrong."""
    blocker = next((p for p in (path, *path.parents) if os.path.exists(p)), None)
    return blocker if blocker is not None and not os.path.isdir(blocker) else None


def _usable_dir(path: Path) -> Path:
    blocker = file_in_the_way(path)
    if blocker is not None:
        inside = "" if blocker == path else f": {str(blocker)!r}"
        raise ConfigError(f"chunk_store_dir {str(path)!r}{inside} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"chunk_store_dir {str(path)!r} cannot be created: {e}") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"chunk_store_dir {str(path)!r} is not readable and writable")
    return path


def _header(entry: ChunkKV, frequency: int) -> dict[str, str]:
    return {
        "format": FORMAT,
        "chunk_id": json.dumps(entry.chunk_id),
        "token_ids": json.dumps(list(entry.token_ids)),
        "start_position": str(entry.start_position),
        "context_hash": entry.context_hash,
        "frequency": str(frequency),
    }


def _read_header(path: Path) -> tuple[EntryMeta, int]:
    """The entry a file holds, checked against its name and KV shape; raises on anything
    wrong (safetensors itself refuses a truncated file)."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        shape = f.get_slice("kv").get_shape()
    if header.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    token_ids = tuple(int(t) for t in json.loads(header["token_ids"]))
    chunk_id = json.loads(header["chunk_id"])
    if chunk_id is not None and not isinstance(chunk_id, str):
        raise ValueError(f"bad chunk_id {chunk_id!r}")
    content = content_hash(token_ids)
    key = entry_key(header["context_hash"], content)
    if path.name != f"{key}{SUFFIX}":
        raise ValueError("the header does not match the file name")
    if len(shape) != 5 or shape[1] != 2 or shape[3] != len(token_ids):
        raise ValueError(f"kv shape {shape} does not fit {len(token_ids)} tokens")
    frequency = int(header["frequency"])
    if frequency < 1:
        raise ValueError(f"bad frequency {frequency}")
    meta = EntryMeta(
        key=key,
        chunk_id=chunk_id,
        token_ids=token_ids,
        content=content,
        context_hash=header["context_hash"],
        start_position=int(header["start_position"]),
        nbytes=path.stat().st_size,
    )
    return meta, frequency
