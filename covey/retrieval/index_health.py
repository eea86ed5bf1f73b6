"""`covey index --verify` and `--repair`: report every version's integrity, and restore the
newest consistent version as a new commit.

Verify only reads. Repair keeps what can be kept: it starts from the newest version whose
record and chunk store are intact, re-embeds its vectors or rebuilds its faiss index if
those are damaged, and commits the result as a new version with a fresh manifest. When the
newest version's chunks are lost, the older version it restores is named, so nothing is
dropped without saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from covey.errors import IndexNotFoundError, RetrievalError
from covey.retrieval import store
from covey.retrieval.embedder import EmbedderLike
from covey.retrieval.integrity import CHUNKS, FAISS, RECORD, VECTORS, VersionCheck
from covey.retrieval.tokenizers import TokenizerLike

_RECOVERABLE = {
    VECTORS: "re-embedded from chunks.sqlite on open and by --repair",
    FAISS: "rebuilt from vectors.npy on open and by --repair",
}


@dataclass
class HealthReport:
    """One line per finding; `problems` counts those that --repair would act on."""

    root: Path
    lines: list[str] = field(default_factory=list)
    problems: int = 0


def _manifest_line(manifest: store.ManifestState, newest: VersionCheck | None) -> tuple[str, bool]:
    if not manifest.exists:
        return f"{store.MANIFEST}: missing", True
    if manifest.content is None:
        return f"{store.MANIFEST}: {manifest.problem}", True
    named = manifest.content["version"]
    if newest is None or named != newest.name:
        latest = newest.name if newest else "none"
        return f"{store.MANIFEST}: names {named}, but the newest version is {latest}", True
    if newest.record is not None and store.records_differ(manifest.content, newest.record):
        return f"{store.MANIFEST}: disagrees with {named}/{RECORD}", True
    return f"{store.MANIFEST}: ok (names {named})", False


def _version_line(check: VersionCheck, newest: bool) -> str:
    tag = " (newest)" if newest else ""
    if check.record is None:
        return f"{check.name}{tag}: {RECORD}: {check.problems[RECORD]}"
    r = check.record
    head = (
        f"{check.name}{tag}: {r['num_chunks']} chunks from {r.get('num_sources', '?')} "
        f"sources, faiss {r['index'].get('kind', '?')}"
    )
    if check.ok:
        return f"{head}: ok"
    found = [
        f"{name}: {why}" + (f" ({_RECOVERABLE[name]})" if name in _RECOVERABLE else "")
        for name, why in check.problems.items()
    ]
    return f"{head}: " + "; ".join(found)


def verify_index(root: str | Path) -> HealthReport:
    """Check the manifest and every committed version, newest first; changes nothing."""
    root = Path(root)
    manifest, checks = store.check_all(root)
    if not checks and not manifest.exists:
        raise IndexNotFoundError(f"no index at {root} (no {store.MANIFEST}, no versions)")
    report = HealthReport(root)
    line, bad = _manifest_line(manifest, checks[0] if checks else None)
    report.lines.append(line)
    report.problems += bad
    for i, check in enumerate(checks):
        line = _version_line(check, newest=i == 0)
        if i > 0 and check.problems:  # never served; the next commit collects it
            line += " (an older version: not served)"
        report.lines.append(line)
        report.problems += len(check.problems) if i == 0 else 0
        partial = (check.record or {}).get("partial")
        if i == 0 and partial:
            report.lines.append(
                f"{check.name}: holds the first {partial['chunks']} chunks of "
                f"{partial['source']} (an interrupted ingest: re-run it to finish)"
            )
    leftovers = sorted(set(store.version_folders(root)) - {c.name for c in checks})
    for name in leftovers:
        report.lines.append(f"{name}: never committed (no {RECORD}); ignored")
    return report


def repair_index(
    root: str | Path,
    embedder: EmbedderLike | None = None,
    tokenizer: TokenizerLike | None = None,
) -> HealthReport:
    """Commit the newest consistent state as a new version; says what it did."""
    from covey.retrieval.document_index import DocumentIndex
    from covey.retrieval.vector_index import IndexConfig

    root = Path(root)
    manifest, checks = store.check_all(root)
    if not checks:
        raise IndexNotFoundError(f"no index at {root}: {root / 'versions'} holds no version")
    report = HealthReport(root)
    newest = checks[0]
    manifest_line, manifest_bad = _manifest_line(manifest, newest)
    if not manifest_bad and newest.ok:
        report.lines.append(f"nothing to repair: {newest.name} and {store.MANIFEST} are intact")
        return report
    target = next((c for c in checks if c.chunks_usable), None)
    if target is None:
        file = RECORD if RECORD in newest.problems else CHUNKS
        raise RetrievalError(
            f"cannot repair {root}: no version has an intact record and chunk store "
            f"({newest.folder / file}: {newest.problems[file]}); rebuild the index from its "
            "sources"
        )
    if manifest_bad:
        report.lines.append(f"{manifest_line}: rewritten")
    if target is not newest:
        file = RECORD if RECORD in newest.problems else CHUNKS
        report.lines.append(
            f"{newest.name}: {file}: {newest.problems[file]}: its chunks cannot be recovered; "
            f"restored {target.name} ({len(target.chunks or [])} chunks) instead"
        )
    if VECTORS in target.problems:
        report.lines.append(
            f"{target.name}: {VECTORS}: {target.problems[VECTORS]}: re-embedded "
            f"{len(target.chunks or [])} chunks from {CHUNKS}"
        )
    if FAISS in target.problems:
        report.lines.append(f"{target.name}: {FAISS}: {target.problems[FAISS]}: rebuilt")
    assert target.record is not None and target.chunks is not None
    snap = store.Snapshot(
        target.record, target.chunks, target.sources or {}, target.vectors, target.faiss_index
    )
    index = DocumentIndex(
        root, snap, embedder, tokenizer, IndexConfig(**target.record["index"]["config"])
    )
    index._version = newest.name  # this commit supersedes the newest version, damaged or not
    index.commit()
    report.problems = len(report.lines)
    report.lines.append(f"committed {index.manifest['version']} ({len(index)} chunks)")
    return report
