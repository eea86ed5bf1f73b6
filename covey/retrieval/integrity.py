"""Check one index version against its own record: sizes, sha256 and counts of every file.

Each version folder carries `version.json`, the record of what its commit wrote: the chunk,
source and vector counts, the faiss kind, and the size and sha256 of each data file. A
version whose files disagree with it is never served as if it were fine: the check names
the file and says what is wrong, and the caller decides whether that damage is recoverable
(vectors re-embedded from the chunks, a faiss index rebuilt from the vectors) or not.

Versions written before records existed (no `version.json`, no `files`) are checked by
counts alone, which still catches a swapped or extended file in most cases.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covey.retrieval.documents import Chunk

CHUNKS = "chunks.sqlite"
VECTORS = "vectors.npy"
FAISS = "index.faiss"
RECORD = "version.json"
DATA_FILES = (CHUNKS, VECTORS, FAISS)
VERSION_NAME = re.compile(r"v\d{6}")
# Keys a record (or manifest) must hold for the index to be opened from it at all.
REQUIRED_KEYS = ("version", "embedder", "chunker", "index", "num_chunks")


@dataclass
class VersionCheck:
    """What checking one version found. `problems` maps a file name to what is wrong with
    it; data that loaded cleanly is kept so the caller need not read it twice."""

    folder: Path
    record: dict[str, Any] | None = None
    problems: dict[str, str] = field(default_factory=dict)
    chunks: list[Chunk] | None = None
    sources: dict[str, str] | None = None
    vectors: np.ndarray | None = None
    faiss_index: Any = None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def chunks_usable(self) -> bool:
        """The record and the chunk store are intact: everything else can be rebuilt."""
        return RECORD not in self.problems and CHUNKS not in self.problems

    @property
    def ok(self) -> bool:
        return not self.problems


def file_digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def record_problem(record: Any) -> str | None:
    """Why `record` cannot describe a version, or None when it can."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(record["version"], str) or not VERSION_NAME.fullmatch(record["version"]):
        return f"version {record['version']!r} is not a version name"
    embedder = record["embedder"]
    if not isinstance(embedder, dict) or not {"name", "dimension"} <= set(embedder):
        return "embedder lacks name or dimension"
    if not isinstance(record["num_chunks"], int) or record["num_chunks"] < 0:
        return f"num_chunks {record['num_chunks']!r} is not a count"
    try:
        record["chunker"]["config"], record["index"]["config"]
    except (KeyError, TypeError):
        return "chunker or index lacks its config"
    return None


def read_record(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, why) when version.json is missing or unusable."""
    path = folder / RECORD
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    problem = record_problem(record)
    if problem is None and record["version"] != folder.name:
        problem = f"describes {record['version']}, not {folder.name}"
    return (None, problem) if problem else (record, None)


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


def _load_chunks(folder: Path, record: dict[str, Any]) -> tuple[list[Chunk], dict[str, str]]:
    _read_checked(folder, CHUNKS, record)
    try:
        con = sqlite3.connect(f"file:{folder / CHUNKS}?mode=ro", uri=True)
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
    if len(rows) != record["num_chunks"]:
        raise ValueError(f"{len(rows)} chunks, the record says {record['num_chunks']}")
    if "num_sources" in record and len(sources) != record["num_sources"]:
        raise ValueError(f"{len(sources)} sources, the record says {record['num_sources']}")
    return [Chunk(*row) for row in rows], sources


def _load_vectors(folder: Path, record: dict[str, Any]) -> np.ndarray:
    data = _read_checked(folder, VECTORS, record)
    try:
        vectors = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"not a readable .npy array ({exc})") from exc
    shape = (record["num_chunks"], int(record["embedder"]["dimension"]))
    if vectors.shape != shape or vectors.dtype != np.float32:
        raise ValueError(f"{vectors.dtype} {vectors.shape}, the record says float32 {shape}")
    return vectors


def faiss_expected(record: dict[str, Any]) -> bool:
    """Approximate kinds are stored; an exact (flat) index is rebuilt on open, cheaply."""
    kind = record["index"].get("kind")
    return kind not in (None, "flat") and record["num_chunks"] > 0


def _load_faiss(folder: Path, record: dict[str, Any]):
    from covey.retrieval.vector_index import load_faiss

    faiss = load_faiss()
    data = _read_checked(folder, FAISS, record)
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160]
        raise ValueError(f"not a readable faiss index ({first})") from exc
    dim = int(record["embedder"]["dimension"])
    if index.ntotal != record["num_chunks"] or index.d != dim:
        raise ValueError(
            f"holds {index.ntotal} vectors of dimension {index.d}, the record says "
            f"{record['num_chunks']} of dimension {dim}"
        )
    return index


def check_version(folder: Path, fallback_record: dict[str, Any] | None = None) -> VersionCheck:
    """Load and check every file of one version; damage is reported, never raised.

    `fallback_record` (the manifest, when it names this version) stands in for a missing
    version.json: versions written before records existed have none.
    """
    check = VersionCheck(folder)
    record, why = read_record(folder)
    if record is None and fallback_record is not None and why == "missing":
        record = fallback_record
    if record is None:
        check.problems[RECORD] = why or "missing"
        return check
    check.record = record
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
    return check
