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

Opening serves the newest version that has a record (its own version.json, or the manifest
naming it: covey wrote no version.json before this format), after checking each of its
files against that record. Damage that loses nothing is repaired in memory with a warning
(an unreadable manifest, a faiss index rebuilt from the vectors, vectors re-embedded from
the chunks); anything else is a RetrievalError that names the file and points at
`covey index --repair`. A newer folder without any record is never served, never
committed on top of and never collected: only --repair, which rebuilds its record from its
data files, decides what it holds.

Garbage collection removes only what a commit superseded: the versions its parent version
itself superseded (up to the parent's `previous_version`), and temporary folders of dead
writers. The parent stays, as the previous version.
"""

from __future__ import annotations

import errno
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

from covey.atomic_files import fsync_path, replace_atomically
from covey.errors import IndexNotFoundError, RetrievalError
from covey.retrieval.documents import Chunk
from covey.retrieval.integrity import (
    CHUNKS,
    FAISS,
    MANIFEST,
    RECORD,
    VECTORS,
    VERSION_NAME,
    VersionCheck,
    check_version,
    file_digest,
    partial_sources,
    read_record,
    record_problem,
    records_differ,
    settings_template,
)
from covey.retrieval.vector_index import load_faiss

FORMAT = 1
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
    `warnings` say what opening had to recover from; `orphans` count, per source, chunks
    an interrupted ingest left without a sources entry or a partial marker."""

    manifest: dict[str, Any]
    chunks: list[Chunk]
    sources: dict[str, str]
    vectors: np.ndarray | None
    faiss_index: Any = None
    warnings: list[str] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=dict)


@dataclass
class ManifestState:
    """manifest.json as found: its content, or why it could not be used."""

    path: Path
    content: dict[str, Any] | None = None
    problem: str | None = None  # None: readable and well formed (or absent, see exists)
    exists: bool = True

    @property
    def named(self) -> str | None:
        return self.content["version"] if self.content else None


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
    try:
        return sorted(p.name for p in versions.iterdir() if VERSION_NAME.fullmatch(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise RetrievalError(f"cannot list {versions}: {exc.strerror or exc}") from exc


@dataclass
class Listing:
    """The version folders of an index and where each one's record is, without reading
    any data file. `recorded` are folders with a record (their own version.json, or the
    manifest naming them); `unrecorded` maps the others to why version.json is unusable."""

    root: Path
    manifest: ManifestState
    folders: list[str]
    recorded: list[str]
    unrecorded: dict[str, str]

    @property
    def served(self) -> str | None:
        """The newest version with a record: the one opening serves and commits build on."""
        return self.recorded[-1] if self.recorded else None

    def unrecorded_above(self, name: str | None) -> list[str]:
        return [f for f in self.unrecorded if name is None or f > name]

    def template(self) -> dict[str, Any] | None:
        """Index-wide settings (embedder, chunker, faiss config) from any record found."""
        if self.manifest.content is not None:
            return self.manifest.content
        for name in reversed(self.folders):
            record = settings_template(self.root / "versions" / name)
            if record is not None:
                return record
        return None


def list_versions(root: Path) -> Listing:
    manifest = read_manifest_state(root)
    folders = version_folders(root)
    recorded, unrecorded = [], {}
    for name in folders:
        record, why = read_record(root / "versions" / name)
        if record is not None or name == manifest.named:
            recorded.append(name)
        else:
            unrecorded[name] = why or "missing"
    return Listing(root, manifest, folders, recorded, unrecorded)


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


def repair_hint(root: Path) -> str:
    return f"run `covey index --repair {root}` to restore the newest consistent version"


def read_snapshot(root: Path) -> Snapshot:
    """Load the newest version that has a record, checked against it; raises
    IndexNotFoundError if there is none, RetrievalError naming the file if it is damaged
    beyond what can be rebuilt.

    A reader racing a writer (checkpoints commit every few seconds, and each commit
    collects what its parent superseded) may find the version it chose half removed: when
    a check finds problems and the folder is gone or a newer version appeared, it lists
    the versions again and retries once."""
    for attempt in (1, 2):
        listing = list_versions(root)
        if listing.served is None:
            raise _nothing_to_serve(root, listing)
        named = listing.manifest.content if listing.manifest.named == listing.served else None
        check = check_version(root / "versions" / listing.served, named)
        if attempt == 1 and check.problems and _moved_on(root, listing):
            continue
        break
    warnings = _manifest_warnings(listing) + _unrecorded_warnings(listing)
    if check.record_from == "own" and named is not None and records_differ(named, check.record):
        warnings.append(
            f"{listing.manifest.path} disagrees with {check.folder / RECORD}; used the "
            "version's own record (the next commit rewrites the manifest)"
        )
    return _snapshot_from_check(root, check, warnings)


def _moved_on(root: Path, listing: Listing) -> bool:
    folder = root / "versions" / str(listing.served)
    return not folder.is_dir() or list_versions(root).served != listing.served


def _nothing_to_serve(root: Path, listing: Listing) -> Exception:
    manifest = listing.manifest
    if not manifest.exists and not listing.folders:
        return IndexNotFoundError(
            f"no index at {root} (missing {MANIFEST}); build one with `covey index PATH "
            f"--index {root}` or DocumentIndex.create()"
        )
    if manifest.content is not None:
        state = f"names {manifest.named}, which is not in {root / 'versions'}"
    else:
        state = f"is {manifest.problem or 'missing'}"
    if not listing.folders:
        return RetrievalError(f"{manifest.path} {state}, and no version folder is left")
    names = ", ".join(listing.folders)
    found = (
        f"{manifest.path} {state}, and no folder in {root / 'versions'} ({names}) has a "
        f"usable {RECORD} (an index written by an older covey, or damage)"
    )
    if listing.template() is not None:
        return RetrievalError(f"{found}; run `covey index --repair {root}` to rebuild it")
    return RetrievalError(
        f"{found}; nothing says which embedder and chunker built it: move {root} aside and "
        f"rebuild the index from its sources (`covey index PATH --index {root}`)"
    )


def _manifest_warnings(listing: Listing) -> list[str]:
    manifest, served = listing.manifest, listing.served
    if manifest.content is None:
        why = manifest.problem if manifest.exists else "missing"
        return [
            f"{manifest.path} is {why}; serving {served} from its own record (the next "
            "commit rewrites the manifest)"
        ]
    named = manifest.named
    if named not in listing.folders:
        return [f"{manifest.path} names {named}, which is not in versions/; serving {served}"]
    if named == served or _writer_active(listing.root):
        return []  # the second case: a commit between its rename and its manifest
    return [
        f"{manifest.path} names {named}, which is older than {served} (an interrupted "
        f"commit, or an older copy of the manifest); serving {served}"
    ]


def _unrecorded_warnings(listing: Listing) -> list[str]:
    return [
        f"{listing.root / 'versions' / name} is newer than {listing.served} but has no "
        f"usable {RECORD} ({why}): not served, and the index refuses commits until "
        f"`covey index --repair {listing.root}` restores the newest consistent version"
        for name, why in listing.unrecorded.items()
        if name > str(listing.served)
    ]


def _snapshot_from_check(root: Path, check: VersionCheck, warnings: list[str]) -> Snapshot:
    if not check.chunks_usable:
        file = check.fatal_file
        raise RetrievalError(
            f"{check.folder / file} is damaged: {check.problems[file]}; {repair_hint(root)}"
        )
    assert check.record is not None and check.chunks is not None and check.sources is not None
    if RECORD in check.problems:
        warnings.append(
            f"{check.folder / RECORD} is damaged ({check.problems[RECORD]}); "
            f"`covey index --repair {root}` rewrites it"
        )
    if VECTORS in check.problems:
        warnings.append(
            f"{check.folder / VECTORS} is damaged ({check.problems[VECTORS]}); its "
            f"{len(check.chunks)} chunks are re-embedded from {CHUNKS} when a vector search "
            f"or a write first needs them, on every open until `covey index --repair {root}` "
            "stores them"
        )
    if FAISS in check.problems:
        warnings.append(
            f"{check.folder / FAISS} is damaged ({check.problems[FAISS]}); rebuilt it from "
            f"{VECTORS}"
        )
    if check.orphans:
        listed = ", ".join(f"{s} ({n})" for s, n in list(check.orphans.items())[:5])
        warnings.append(
            f"{check.folder / CHUNKS} holds chunks of sources an interrupted ingest left "
            f"unfinished and unmarked: {listed}; kept as partial (re-run that ingest to "
            f"finish them, or `covey index --repair {root}` to record them)"
        )
    return Snapshot(
        check.record,
        check.chunks,
        check.sources,
        check.vectors,
        check.faiss_index,
        warnings,
        check.orphans,
    )


def check_all(root: Path) -> tuple[Listing, list[VersionCheck]]:
    """The listing and a check of every version folder, newest first (for --verify and
    --repair). Folders without a record are checked against one rebuilt from their data."""
    listing = list_versions(root)
    template = listing.template()
    checks = []
    for name in reversed(listing.folders):
        named = listing.manifest.content if name == listing.manifest.named else None
        checks.append(check_version(root / "versions" / name, named, template))
    return listing, checks


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
    """Refuse to write a version whose parts disagree: it would be committed damage. Every
    chunk belongs to a complete source or to one marked partial (a checkpointed ingest)."""
    n, dim = len(snap.chunks), int(snap.manifest["embedder"]["dimension"])
    problems = []
    if snap.vectors is None or snap.vectors.shape != (n, dim):
        shape = None if snap.vectors is None else snap.vectors.shape
        problems.append(f"vectors {shape} for {n} chunks of dimension {dim}")
    if snap.faiss_index is not None and snap.faiss_index.ntotal != n:
        problems.append(f"faiss holds {snap.faiss_index.ntotal} vectors for {n} chunks")
    if snap.manifest.get("num_chunks", n) != n:
        problems.append(f"the record says {snap.manifest['num_chunks']} chunks, not {n}")
    accounted = snap.sources.keys() | partial_sources(snap.manifest).keys()
    stray = sorted({c.source for c in snap.chunks} - accounted)
    if stray:
        problems.append(f"chunks of sources neither complete nor partial: {stray[:5]}")
    if problems:
        raise RetrievalError(f"refusing to commit an inconsistent index: {'; '.join(problems)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


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


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    replace_atomically(path, lambda t: _write_json(t, data), tmp, durable=True)


def _remove_temporary(versions: Path) -> None:
    """Temporary folders of dead writers (a live writer holds the lock, and so do we)."""
    for name in os.listdir(versions) if versions.is_dir() else []:
        if _TMP.fullmatch(name):
            shutil.rmtree(versions / name, ignore_errors=True)


def _collect_garbage(versions: Path, parent: str | None, superseded: str | None) -> None:
    """Remove what a commit on top of `parent` superseded: the versions `parent` itself
    superseded, i.e. up to its `previous_version`. `parent` stays as the previous version,
    and so does every folder between the two (nothing recorded that they were replaced)."""
    if parent is None or superseded is None:
        return
    for name in os.listdir(versions):
        if VERSION_NAME.fullmatch(name) and name < parent and name <= superseded:
            shutil.rmtree(versions / name, ignore_errors=True)


def _write_new_version(versions: Path, name: str, snap: Snapshot, record: dict) -> None:
    """Write the version into a temporary folder and rename it to `name`: the commit."""
    tmp = versions / f".tmp-{uuid.uuid4().hex}"
    try:
        record["files"] = _write_version(tmp, snap)
        _write_json(tmp / RECORD, record)
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RetrievalError(f"cannot write the new version in {versions}: {_reason(exc)}") from exc
    _pause_for_tests()
    try:
        os.rename(tmp, versions / name)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise RetrievalError(
                f"another writer committed {versions / name} meanwhile; reopen the index and "
                "retry"
            ) from exc
        raise RetrievalError(f"cannot commit {versions / name}: {_reason(exc)}") from exc


def commit_snapshot(
    root: Path, snap: Snapshot, expected_version: str | None, repair: bool = False
) -> str:
    """Write `snap` as the next version, then point the manifest at it; returns its name.

    `expected_version` is the newest version with a record when this writer opened the
    index: if another writer committed since, this one would silently drop that work, so
    it fails instead. A newer folder without a record is refused too (only `repair`, which
    has checked every folder, commits over one). The snapshot's own version, the one it was
    built from, becomes `previous_version`; what that one superseded is collected.
    """
    check_consistent(snap)
    versions = root / "versions"
    base = snap.manifest.get("version")
    superseded = snap.manifest.get("previous_version")
    with commit_lock(root):
        listing = list_versions(root)
        current = listing.served
        if current != expected_version:
            raise RetrievalError(
                f"index {root} was changed by another writer (now {current}, opened at "
                f"{expected_version}); reopen it and retry"
            )
        above = listing.unrecorded_above(current)
        if above and not repair:
            raise RetrievalError(
                f"refusing to commit on top of {current}: {versions / above[-1]} is newer and "
                f"has no usable {RECORD} ({listing.unrecorded[above[-1]]}); "
                f"{repair_hint(root)}"
            )
        try:
            versions.mkdir(exist_ok=True)
            _remove_temporary(versions)
        except OSError as exc:
            raise RetrievalError(f"cannot write to {versions}: {_reason(exc)}") from exc
        number = int(listing.folders[-1][1:]) + 1 if listing.folders else 1
        name = f"v{number:06d}"
        record = dict(snap.manifest, format=FORMAT, version=name, previous_version=base)
        _write_new_version(versions, name, snap, record)
        try:
            fsync_path(versions)
            _atomic_write_json(root / MANIFEST, record)
        except OSError as exc:
            raise RetrievalError(
                f"committed {name}, but cannot write {root / MANIFEST}: {_reason(exc)}; "
                f"{name} is served anyway (the next commit rewrites the manifest)"
            ) from exc
        _collect_garbage(versions, base, superseded)
        snap.manifest = record
    return name
