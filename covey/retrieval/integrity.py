"""Check one index version against its record: sizes, sha256 and counts of every file.

Each version folder carries `version.json`, the record of what its commit wrote: the chunk,
source and vector counts, the faiss kind, and the size and sha256 of each data file. A
version whose files disagree with it is never served as if it were fine: the check names
the file and says what is wrong, and the caller decides whether that damage is recoverable
(vectors re-embedded from the chunks, a faiss index rebuilt from the vectors) or not.

The record can come from three places, in this order of trust:
- the folder's own version.json;
- manifest.json, when it names this folder: a byte-identical copy written by the same
  commit, and the only record of versions written by covey before version.json existed;
- rebuilt from the data files themselves (counts and shapes) with the index-wide settings
  (embedder, chunker, faiss config) of another record: for --repair of a folder whose
  record is lost, or one written by an older covey whose manifest is gone.
A record that does not come from the folder itself is a problem to repair, except for the
old format (a manifest without `files` naming the folder), which is simply older.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covey.errors import ConfigError
from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.documents import Chunk
from covey.retrieval.vector_index import IndexConfig

CHUNKS = "chunks.sqlite"
VECTORS = "vectors.npy"
FAISS = "index.faiss"
RECORD = "version.json"
MANIFEST = "manifest.json"
DATA_FILES = (CHUNKS, VECTORS, FAISS)
VERSION_NAME = re.compile(r"v\d{6}")
# Keys a record (or manifest) must hold for the index to be opened from it at all.
REQUIRED_KEYS = ("version", "embedder", "chunker", "index", "num_chunks")
# Per-version facts; the rest of a record (embedder, chunker, faiss config) is index-wide.
# `corpus` (the default corpus a version completely holds) too: a rebuilt record leaves it
# out, so the default index is checked against its corpus again rather than trusted.
_PER_VERSION = (
    "files",
    "partial",
    "previous_version",
    "updated",
    "num_sources",
    "num_tokens",
    "corpus",
)


@dataclass
class VersionCheck:
    """What checking one version found. `problems` maps a file name to what is wrong with
    it; data that loaded cleanly is kept so the caller need not read it twice.

    `record_from` says where the record came from: "own", "manifest" or "rebuilt" (None:
    no record at all). `orphans` counts, per source, chunks that neither the sources table
    nor the record's `partial` account for (left by an interrupted ingest)."""

    folder: Path
    record: dict[str, Any] | None = None
    record_from: str | None = None
    problems: dict[str, str] = field(default_factory=dict)
    chunks: list[Chunk] | None = None
    sources: dict[str, str] | None = None
    vectors: np.ndarray | None = None
    faiss_index: Any = None
    orphans: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def chunks_usable(self) -> bool:
        """A record and an intact chunk store: everything else can be rebuilt."""
        return self.record is not None and CHUNKS not in self.problems

    @property
    def fatal_file(self) -> str:
        """The file whose damage makes this version unusable (see chunks_usable)."""
        return RECORD if self.record is None else CHUNKS

    @property
    def ok(self) -> bool:
        return not self.problems and not self.orphans


def file_digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def partial_sources(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sources whose ingest a checkpoint cut off: source -> {"content_hash", "chunks"}.
    Records of the first checkpointing covey held one such source as {"source": ...}."""
    partial = record.get("partial") or {}
    if isinstance(partial.get("source"), str):
        rest = {k: v for k, v in partial.items() if k != "source"}
        return {partial["source"]: rest}
    return {source: dict(info) for source, info in partial.items()}


def _partial_problem(partial: Any) -> str | None:
    if partial is None:
        return None
    if not isinstance(partial, dict):
        return "partial is not an object"
    entries = [partial] if isinstance(partial.get("source"), str) else list(partial.values())
    if not all(isinstance(e, dict) and _is_count(e.get("chunks")) for e in entries):
        return "partial lacks chunk counts"
    return None


def _settings_problem(record: dict[str, Any]) -> str | None:
    embedder, chunker, index = record["embedder"], record["chunker"], record["index"]
    if not isinstance(embedder, dict) or not isinstance(embedder.get("name"), str):
        return "embedder lacks a name"
    dim = embedder.get("dimension")
    if not _is_count(dim) or dim == 0:
        return f"embedder dimension {dim!r} is not a positive integer"
    for key, section, config_class in (
        ("chunker", chunker, ChunkerConfig),
        ("index", index, IndexConfig),
    ):
        if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
            return f"{key} lacks its config"
        try:
            config_class(**section["config"])
        except (TypeError, ValueError, ConfigError) as exc:
            return f"{key} config is invalid ({exc})"
    if not isinstance(chunker.get("tokenizer", ""), str):
        return "chunker tokenizer is not a name"
    return None


def record_problem(record: Any) -> str | None:
    """Why `record` cannot describe a version, or None when it can. Every value the index
    is built from is type-checked here, so a malformed record is reported, not a crash."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(record["version"], str) or not VERSION_NAME.fullmatch(record["version"]):
        return f"version {record['version']!r} is not a version name"
    previous = record.get("previous_version")
    if previous is not None and not (
        isinstance(previous, str) and VERSION_NAME.fullmatch(previous)
    ):
        return f"previous_version {previous!r} is not a version name"
    if not _is_count(record["num_chunks"]):
        return f"num_chunks {record['num_chunks']!r} is not a count"
    if "num_sources" in record and not _is_count(record["num_sources"]):
        return f"num_sources {record['num_sources']!r} is not a count"
    files = record.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and _is_count(f.get("bytes")) and isinstance(f.get("sha256"), str)
        for f in files.values()
    ):
        return "files lacks sizes or checksums"
    return _settings_problem(record) or _partial_problem(record.get("partial"))


def _parse_record(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """version.json's content if it is a well-formed record (of any version), or why not."""
    try:
        record = json.loads((folder / RECORD).read_bytes())
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    problem = record_problem(record)
    return (None, problem) if problem else (record, None)


def read_record(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, why) when version.json is missing or unusable."""
    record, why = _parse_record(folder)
    if record is not None and record["version"] != folder.name:
        return None, f"describes {record['version']}, not {folder.name}"
    return record, why


def settings_template(folder: Path) -> dict[str, Any] | None:
    """version.json's index-wide settings even if it describes another version (a swap)."""
    return _parse_record(folder)[0]


def _read_checked(folder: Path, name: str, record: dict[str, Any]) -> bytes:
    """The file's bytes; raises ValueError saying how they differ from the record."""
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        raise ValueError("missing") from None
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror or exc})") from exc
    expected = record.get("files", {}).get(name)
    if expected is not None:
        got = file_digest(data)
        if got["bytes"] != expected["bytes"]:
            raise ValueError(f"{got['bytes']} bytes, the record says {expected['bytes']}")
        if got["sha256"] != expected["sha256"]:
            raise ValueError("sha256 differs from the record (same size, other content)")
    return data


def _read_chunk_store(path: Path) -> tuple[list[Chunk], dict[str, str]]:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT id, text, source, start_char, end_char, num_tokens FROM chunks "
                "ORDER BY pos"
            ).fetchall()
            sources = dict(con.execute("SELECT source, content_hash FROM sources").fetchall())
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ValueError(f"not a readable chunk store ({exc})") from exc
    return [Chunk(*row) for row in rows], sources


def _load_chunks(folder: Path, record: dict[str, Any]) -> tuple[list[Chunk], dict[str, str]]:
    _read_checked(folder, CHUNKS, record)
    chunks, sources = _read_chunk_store(folder / CHUNKS)
    if len(chunks) != record["num_chunks"]:
        raise ValueError(f"{len(chunks)} chunks, the record says {record['num_chunks']}")
    if "num_sources" in record and len(sources) != record["num_sources"]:
        raise ValueError(f"{len(sources)} sources, the record says {record['num_sources']}")
    return chunks, sources


def _load_vectors(folder: Path, record: dict[str, Any]) -> np.ndarray:
    data = _read_checked(folder, VECTORS, record)
    try:
        vectors = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"not a readable .npy array ({exc})") from exc
    shape = (record["num_chunks"], record["embedder"]["dimension"])
    if vectors.shape != shape or vectors.dtype != np.float32:
        raise ValueError(f"{vectors.dtype} {vectors.shape}, the record says float32 {shape}")
    return vectors


def faiss_expected(record: dict[str, Any]) -> bool:
    """Approximate kinds are stored; an exact (flat) index is rebuilt on open, cheaply."""
    kind = record["index"].get("kind")
    return kind not in (None, "flat") and record["num_chunks"] > 0


def _deserialize_faiss(data: bytes):
    from covey.retrieval.vector_index import load_faiss

    faiss = load_faiss()
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160]
        raise ValueError(f"not a readable faiss index ({first})") from exc


def _load_faiss(folder: Path, record: dict[str, Any]):
    index = _deserialize_faiss(_read_checked(folder, FAISS, record))
    dim = record["embedder"]["dimension"]
    if index.ntotal != record["num_chunks"] or index.d != dim:
        raise ValueError(
            f"holds {index.ntotal} vectors of dimension {index.d}, the record says "
            f"{record['num_chunks']} of dimension {dim}"
        )
    return index


def _faiss_kind(folder: Path) -> str:
    """The kind of a record-less folder's faiss file: none is stored for flat."""
    try:
        data = (folder / FAISS).read_bytes()
    except FileNotFoundError:
        return "flat"
    except OSError:
        return "unknown"
    try:
        name = type(_deserialize_faiss(data)).__name__
    except ValueError:
        return "unknown"
    return "hnsw" if "HNSW" in name else "ivf" if "IVF" in name else "flat"


def rebuild_record(folder: Path, template: dict[str, Any]) -> dict[str, Any]:
    """A record for a folder that has none: the template's index-wide settings, and the
    counts of the folder's own chunk store (raises ValueError if that is unreadable)."""
    _read_checked(folder, CHUNKS, {})
    chunks, sources = _read_chunk_store(folder / CHUNKS)
    record = {k: v for k, v in template.items() if k not in _PER_VERSION}
    index = dict(template["index"], kind=_faiss_kind(folder))
    index.pop("recall_at_10", None)
    record.update(
        version=folder.name,
        index=index,
        num_chunks=len(chunks),
        num_sources=len(sources),
        num_tokens=sum(c.num_tokens for c in chunks),
    )
    return record


def records_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("version", "num_chunks", "num_sources", "files", "embedder", "index", "partial")
    return any(a.get(k) != b.get(k) for k in keys)


def _load(folder: Path, record: dict[str, Any], source: str) -> VersionCheck:
    check = VersionCheck(folder, record, source)
    try:
        check.chunks, check.sources = _load_chunks(folder, record)
    except ValueError as exc:
        check.problems[CHUNKS] = str(exc)
    try:
        check.vectors = _load_vectors(folder, record)
    except ValueError as exc:
        check.problems[VECTORS] = str(exc)
    if faiss_expected(record):
        try:
            check.faiss_index = _load_faiss(folder, record)
        except ValueError as exc:
            check.problems[FAISS] = str(exc)
    if check.chunks is not None and check.sources is not None:
        accounted = check.sources.keys() | partial_sources(record).keys()
        counts = Counter(c.source for c in check.chunks if c.source not in accounted)
        check.orphans = dict(sorted(counts.items()))
    return check


def check_version(
    folder: Path,
    manifest: dict[str, Any] | None = None,
    template: dict[str, Any] | None = None,
) -> VersionCheck:
    """Load and check every file of one version; damage is reported, never raised.

    `manifest` (the manifest's content, when it names this version) stands in for an
    unusable version.json, or for one whose counts disagree with the data files while the
    manifest's copy agrees. `template` (settings from another record) lets a folder with
    no record at all be checked against a record rebuilt from its own data files.
    """
    own, why = read_record(folder)
    if own is not None:
        check = _load(folder, own, "own")
        if check.problems and manifest is not None and records_differ(manifest, own):
            other = _load(folder, manifest, "manifest")
            if len(other.problems) < len(check.problems):
                other.problems[RECORD] = (
                    f"disagrees with the data files, which match {MANIFEST}'s copy"
                )
                return other
        return check
    if manifest is not None:
        check = _load(folder, manifest, "manifest")
        if why != "missing" or "files" in manifest:  # an old-format version has no record
            check.problems[RECORD] = f"{why}; used {MANIFEST}'s copy of the record"
        return check
    if template is not None:
        try:
            record = rebuild_record(folder, template)
        except ValueError as exc:
            return VersionCheck(folder, problems={RECORD: why or "missing", CHUNKS: str(exc)})
        check = _load(folder, record, "rebuilt")
        check.problems[RECORD] = f"{why}; rebuilt from the data files"
        return check
    return VersionCheck(folder, problems={RECORD: why or "missing"})
