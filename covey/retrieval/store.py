"""On-disk index: self-describing version folders, and a manifest naming the current one.

Layout of an index directory:
    manifest.json          a copy of the current version's record, rewritten by each commit
    versions/v000007/      chunks.sqlite, vectors.npy, index.faiss (approximate kinds only),
                           version.json (counts, and the size and sha256 of each file)
    .lock                  held while committing

A commit writes a whole new version into a temporary folder, fsyncs it, and renames it to
the next version name: that rename is the commit point. manifest.json is then replaced
(write temp, fsync, os.replace). A crash or kill before the rename leaves the previous
version current and untouched; one between the rename and the manifest leaves the new
version complete, and it is served (a stale manifest is reported, never trusted over it).

Opening serves the newest version, after checking each of its files against its record.
Damage that loses nothing is repaired in memory with a warning (an unreadable manifest, a
faiss index rebuilt from the vectors, vectors re-embedded from the chunks); anything else
is a RetrievalError that names the file and points at `covey index --repair`.

Garbage collection removes only what a commit superseded: versions older than the one it
was built on (whose record was read and checked), and temporary folders of dead writers.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covey.errors import IndexNotFoundError, RetrievalError
from covey.retrieval.documents import Chunk
from covey.retrieval.integrity import (
    CHUNKS,
    FAISS,
    RECORD,
    VECTORS,
    VERSION_NAME,
    VersionCheck,
    check_version,
    file_digest,
    record_problem,
)
from covey.retrieval.vector_index import load_faiss

FORMAT = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
# Test hook: when set to a path, a commit writes that file after its temporary snapshot is
# complete and then sleeps, so a test can SIGKILL the process at the worst moment.
PAUSE_ENV = "COVEY_RETRIEVAL_PAUSE_BEFORE_COMMIT"
_TMP = re.compile(r"\.tmp-[0-9a-f]{32}")

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
    """Everything one version holds. `faiss_index` is None when it is rebuilt on open;
    `vectors` is None when they must be re-embedded from the chunks (damaged on disk).
    `warnings` say what opening had to recover from."""

    manifest: dict[str, Any]
    chunks: list[Chunk]
    sources: dict[str, str]
    vectors: np.ndarray | None
    faiss_index: Any = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class ManifestState:
    """manifest.json as found: its content, or why it could not be used."""

    path: Path
    content: dict[str, Any] | None = None
    problem: str | None = None  # None: readable and well formed (or absent, see exists)
    exists: bool = True


def read_manifest_state(root: Path) -> ManifestState:
    path = root / MANIFEST
    state = ManifestState(path)
    try:
        content = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        state.exists = False
        return state
    except (OSError, ValueError) as exc:
        state.problem = f"unreadable ({exc})"
        return state
    if isinstance(content, dict) and "format" in content and content["format"] != FORMAT:
        raise RetrievalError(f"{path} has format {content['format']!r}, expected {FORMAT}")
    state.problem = record_problem(content)
    if state.problem is None:
        state.content = content
    return state


def version_folders(root: Path) -> list[str]:
    """Names of the version folders under root/versions, oldest first."""
    versions = root / "versions"
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if VERSION_NAME.fullmatch(p.name))


def committed_versions(root: Path, manifest: ManifestState) -> list[str]:
    """Version folders that were committed, oldest first: those with a record, and the one
    a readable manifest names (versions written before records existed have none). A folder
    with neither is a leftover of an interrupted commit by an older covey."""
    named = manifest.content["version"] if manifest.content else None
    return [
        name
        for name in version_folders(root)
        if name == named or (root / "versions" / name / RECORD).exists()
    ]


def index_exists(root: Path) -> bool:
    """True when root holds an index, even one whose manifest is missing or damaged."""
    return (root / MANIFEST).exists() or bool(version_folders(root))


def _writer_active(root: Path) -> bool:
    """True while a writer holds the commit lock (probed without waiting)."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _repair_hint(root: Path) -> str:
    return f"run `covey index --repair {root}` to restore the newest consistent version"


def read_snapshot(root: Path) -> Snapshot:
    """Load the newest committed version, checked against its record; raises
    IndexNotFoundError if there is none, RetrievalError naming the file if it is damaged
    beyond what can be rebuilt."""
    manifest = read_manifest_state(root)
    names = committed_versions(root, manifest)
    if not names:
        if not manifest.exists and not version_folders(root):
            raise IndexNotFoundError(
                f"no index at {root} (missing {MANIFEST}); build one with `covey index PATH "
                f"--index {root}` or DocumentIndex.create()"
            )
        if manifest.content:
            raise RetrievalError(
                f"{manifest.path} names {manifest.content['version']}, which is not in "
                f"{root / 'versions'}; the index data is gone"
            )
        raise RetrievalError(
            f"{manifest.path} is {manifest.problem or 'missing'} and {root / 'versions'} holds "
            "no committed version; nothing to recover from"
        )
    newest = names[-1]
    warnings = _manifest_warnings(root, manifest, newest)
    named = manifest.content if manifest.content and manifest.content["version"] == newest else None
    check = check_version(root / "versions" / newest, named)
    if check.record is not None and named is not None and records_differ(named, check.record):
        warnings.append(
            f"{manifest.path} disagrees with {check.folder / RECORD}; used the version's own "
            "record (the next commit rewrites the manifest)"
        )
    return _snapshot_from_check(root, check, warnings)


def _manifest_warnings(root: Path, manifest: ManifestState, newest: str) -> list[str]:
    if not manifest.exists:
        return [
            f"{manifest.path} is missing; recovered {newest}, the newest version, from its own "
            "record (the next commit rewrites the manifest)"
        ]
    if manifest.content is None:
        return [
            f"{manifest.path} is {manifest.problem}; recovered {newest}, the newest version, "
            "from its own record (the next commit rewrites the manifest)"
        ]
    named = manifest.content["version"]
    if named == newest or _writer_active(root):  # a commit between rename and manifest
        return []
    return [
        f"{manifest.path} names {named} but {newest} is newer (an interrupted commit, or an "
        f"older copy of the manifest); serving {newest}"
    ]


def records_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("version", "num_chunks", "num_sources", "files", "embedder", "index")
    return any(a.get(k) != b.get(k) for k in keys)


def _snapshot_from_check(root: Path, check: VersionCheck, warnings: list[str]) -> Snapshot:
    if not check.chunks_usable:
        file = RECORD if RECORD in check.problems else CHUNKS
        raise RetrievalError(
            f"{check.folder / file} is damaged: {check.problems[file]}; {_repair_hint(root)}"
        )
    assert check.record is not None and check.chunks is not None and check.sources is not None
    if VECTORS in check.problems:
        warnings.append(
            f"{check.folder / VECTORS} is damaged ({check.problems[VECTORS]}); re-embedding "
            f"its {len(check.chunks)} chunks from {CHUNKS} (run `covey index --repair {root}` "
            "to store them)"
        )
    if FAISS in check.problems:
        warnings.append(
            f"{check.folder / FAISS} is damaged ({check.problems[FAISS]}); rebuilt it from "
            f"{VECTORS}"
        )
    return Snapshot(
        check.record, check.chunks, check.sources, check.vectors, check.faiss_index, warnings
    )


def check_all(root: Path) -> tuple[ManifestState, list[VersionCheck]]:
    """The manifest and a check of every committed version, newest first (for --verify
    and --repair)."""
    manifest = read_manifest_state(root)
    named = manifest.content["version"] if manifest.content else None
    checks = [
        check_version(root / "versions" / name, manifest.content if name == named else None)
        for name in reversed(committed_versions(root, manifest))
    ]
    return manifest, checks


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


@contextmanager
def commit_lock(root: Path) -> Iterator[None]:
    """Serialize writers of one index directory (readers never block)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only or missing parent
        raise RetrievalError(
            f"cannot create the index directory {root}: {exc.strerror or exc}"
        ) from exc
    try:
        fh = open(root / LOCK, "a")  # noqa: SIM115 -- closed below, after the unlock
    except OSError as exc:
        raise RetrievalError(
            f"cannot open the lock file {root / LOCK}: {exc.strerror or exc}; it must be a "
            "plain file (remove what is there if no covey process is writing this index)"
        ) from exc
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_consistent(snap: Snapshot) -> None:
    """Refuse to write a version whose parts disagree: it would be committed damage."""
    n, dim = len(snap.chunks), int(snap.manifest["embedder"]["dimension"])
    problems = []
    if snap.vectors is None or snap.vectors.shape != (n, dim):
        shape = None if snap.vectors is None else snap.vectors.shape
        problems.append(f"vectors {shape} for {n} chunks of dimension {dim}")
    if snap.faiss_index is not None and snap.faiss_index.ntotal != n:
        problems.append(f"faiss holds {snap.faiss_index.ntotal} vectors for {n} chunks")
    if snap.manifest.get("num_chunks", n) != n:
        problems.append(f"the record says {snap.manifest['num_chunks']} chunks, not {n}")
    if problems:
        raise RetrievalError(f"refusing to commit an inconsistent index: {'; '.join(problems)}")


def _write_version(folder: Path, snap: Snapshot) -> dict[str, Any]:
    """Write the data files into `folder`; returns their sizes and checksums."""
    faiss = load_faiss()

    folder.mkdir(parents=True)
    _write_sqlite(folder / CHUNKS, snap.chunks, snap.sources)
    with open(folder / VECTORS, "wb") as fh:
        np.save(fh, np.ascontiguousarray(snap.vectors, dtype=np.float32))
    if snap.faiss_index is not None:
        faiss.write_index(snap.faiss_index, str(folder / FAISS))
    return {p.name: file_digest(p.read_bytes()) for p in sorted(folder.iterdir())}


def _pause_for_tests() -> None:
    marker = os.environ.get(PAUSE_ENV)
    if marker:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _collect_garbage(versions: Path, parent: str | None) -> None:
    """Remove what a commit on top of `parent` superseded: versions older than `parent`
    (kept: `parent` itself, as the previous version), and temporary folders of dead writers
    (a live writer holds the lock, and so do we). Any other folder stays."""
    if not versions.is_dir():
        return
    for child in versions.iterdir():
        old = parent is not None and VERSION_NAME.fullmatch(child.name) and child.name < parent
        if old or _TMP.fullmatch(child.name):
            shutil.rmtree(child, ignore_errors=True)


def commit_snapshot(root: Path, snap: Snapshot, expected_version: str | None) -> str:
    """Write `snap` as the next version, then point the manifest at it; returns its name.

    `expected_version` is the newest version when this writer opened the index: if another
    writer committed since, this one would silently drop that work, so it fails instead.
    The new version supersedes it and every older one: those older are collected.
    """
    check_consistent(snap)
    versions = root / "versions"
    with commit_lock(root):
        manifest = read_manifest_state(root)
        names = committed_versions(root, manifest)
        current = names[-1] if names else None
        if current != expected_version:
            raise RetrievalError(
                f"index {root} was changed by another writer (now {current}, opened at "
                f"{expected_version}); reopen it and retry"
            )
        _collect_garbage(versions, None)  # dead writers' temporary folders
        taken = version_folders(root)
        number = int(taken[-1][1:]) + 1 if taken else 1
        name = f"v{number:06d}"
        tmp = versions / f".tmp-{uuid.uuid4().hex}"
        files = _write_version(tmp, snap)
        record = dict(
            snap.manifest, format=FORMAT, version=name, previous_version=current, files=files
        )
        _write_json(tmp / RECORD, record)
        for child in tmp.iterdir():
            _fsync_path(child)
        _fsync_path(tmp)
        _pause_for_tests()
        os.rename(tmp, versions / name)
        _fsync_path(versions)
        _atomic_write_json(root / MANIFEST, record)
        _collect_garbage(versions, expected_version)
        snap.manifest = record
    return name
