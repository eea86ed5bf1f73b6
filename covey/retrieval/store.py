"""On-disk index: versioned snapshot folders and a manifest that points at the current one.

Layout of an index directory:
    manifest.json          the commit point: metadata plus the name of the current version
    versions/v000007/      chunks.sqlite, vectors.npy, index.faiss (approximate kinds only)
    .lock                  held while committing

A commit writes a whole new version into a temporary folder, fsyncs it, renames it into
place and only then replaces manifest.json (write temp, fsync, os.replace). A crash or kill
at any point leaves the previous manifest, and the version it names, untouched.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covey.errors import IndexNotFoundError, RetrievalError
from covey.retrieval.documents import Chunk
from covey.retrieval.vector_index import load_faiss

FORMAT = 1
MANIFEST = "manifest.json"
# Test hook: when set to a path, a commit writes that file after its temporary snapshot is
# complete and then sleeps, so a test can SIGKILL the process at the worst moment.
PAUSE_ENV = "COVEY_RETRIEVAL_PAUSE_BEFORE_COMMIT"

_SCHEMA = """
CREATE TABLE chunks (pos INTEGER PRIMARY KEY, id TEXT NOT NULL, source TEXT NOT NULL,
                     start_char INTEGER NOT NULL, end_char INTEGER NOT NULL,
                     num_tokens INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX chunks_id ON chunks(id);
CREATE INDEX chunks_source ON chunks(source);
CREATE TABLE sources (source TEXT PRIMARY KEY, content_hash TEXT NOT NULL);
"""


@dataclass
class Snapshot:
    """Everything one version holds; `faiss_index` is None when it is rebuilt on open."""

    manifest: dict[str, Any]
    chunks: list[Chunk]
    sources: dict[str, str]
    vectors: np.ndarray
    faiss_index: Any = None


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise IndexNotFoundError(
            f"no index at {root} (missing {MANIFEST}); build one with `covey index PATH "
            f"--index {root}` or DocumentIndex.create()"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RetrievalError(f"unreadable manifest {path}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise RetrievalError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_sqlite(path: Path, chunks: list[Chunk], sources: dict[str, str]) -> None:
    con = sqlite3.connect(path)
    try:
        con.executescript(_SCHEMA)
        con.executemany(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (i, c.id, c.source, c.start, c.end, c.num_tokens, c.text)
                for i, c in enumerate(chunks)
            ],
        )
        con.executemany("INSERT INTO sources VALUES (?, ?)", sorted(sources.items()))
        con.commit()
    finally:
        con.close()


def _read_sqlite(path: Path) -> tuple[list[Chunk], dict[str, str]]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT id, text, source, start_char, end_char, num_tokens FROM chunks ORDER BY pos"
        ).fetchall()
        sources = dict(con.execute("SELECT source, content_hash FROM sources").fetchall())
    finally:
        con.close()
    return [Chunk(*row) for row in rows], sources


def read_snapshot(root: Path) -> Snapshot:
    """Load the version the manifest names; raises IndexNotFoundError if there is none."""
    manifest = read_manifest(root)
    folder = root / "versions" / manifest["version"]
    try:
        chunks, sources = _read_sqlite(folder / "chunks.sqlite")
        vectors = np.load(folder / "vectors.npy")
    except (OSError, sqlite3.Error, ValueError) as exc:
        raise RetrievalError(f"index version {folder} is damaged: {exc}") from exc
    faiss_index = None
    if (folder / "index.faiss").is_file():
        faiss = load_faiss()

        faiss_index = faiss.read_index(str(folder / "index.faiss"))
    return Snapshot(manifest, chunks, sources, vectors, faiss_index)


@contextmanager
def commit_lock(root: Path) -> Iterator[None]:
    """Serialize writers of one index directory (readers never block)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only or missing parent
        raise RetrievalError(
            f"cannot create the index directory {root}: {exc.strerror or exc}"
        ) from exc
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_version(folder: Path, snap: Snapshot) -> None:
    faiss = load_faiss()

    folder.mkdir(parents=True)
    _write_sqlite(folder / "chunks.sqlite", snap.chunks, snap.sources)
    with open(folder / "vectors.npy", "wb") as fh:
        np.save(fh, np.ascontiguousarray(snap.vectors, dtype=np.float32))
    if snap.faiss_index is not None:
        faiss.write_index(snap.faiss_index, str(folder / "index.faiss"))
    for child in folder.iterdir():
        _fsync_path(child)
    _fsync_path(folder)


def _pause_for_tests() -> None:
    marker = os.environ.get(PAUSE_ENV)
    if marker:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _collect_garbage(versions: Path, keep: set[str]) -> None:
    """Drop crashed temp folders and versions no manifest can name (kept: current, previous)."""
    if not versions.is_dir():
        return
    for child in versions.iterdir():
        if child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def commit_snapshot(root: Path, snap: Snapshot, expected_version: str | None) -> str:
    """Write `snap` as the next version and point the manifest at it; returns its name.

    `expected_version` is the version this writer started from: if another writer committed
    since, this one would silently drop that work, so it fails instead.
    """
    versions = root / "versions"
    with commit_lock(root):
        current = None
        if (root / MANIFEST).is_file():
            current = read_manifest(root)["version"]
        if current != expected_version:
            raise RetrievalError(
                f"index {root} was changed by another writer (now {current}, opened at "
                f"{expected_version}); reopen it and retry"
            )
        _collect_garbage(versions, {current, snap.manifest.get("previous_version")} - {None})
        number = int(current[1:]) + 1 if current else 1
        name = f"v{number:06d}"
        tmp = versions / f".tmp-{uuid.uuid4().hex}"
        _write_version(tmp, snap)
        _pause_for_tests()
        os.rename(tmp, versions / name)
        _fsync_path(versions)
        manifest = dict(snap.manifest, format=FORMAT, version=name, previous_version=current)
        _atomic_write_json(root / MANIFEST, manifest)
        _collect_garbage(versions, {name, current} - {None})
        snap.manifest = manifest
    return name
