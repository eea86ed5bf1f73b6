"""DocumentIndex: the user-facing retrieval API over a persistent index directory.

Typical use:
    index = DocumentIndex.create("idx")  # or DocumentIndex.open("idx")
    index.add_files(["docs/"])  # checkpoints every CHECKPOINT_CHUNKS chunks or
                                # CHECKPOINT_SECONDS, and commits at the end
    index.search("how do I sort a dict", k=5, mode="hybrid", sources=[...])
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covey.errors import EmbedderMismatchError, RetrievalError
from covey.retrieval import store
from covey.retrieval.bm25_index import BM25Index
from covey.retrieval.chunker import ChunkerConfig, chunk_document
from covey.retrieval.documents import Chunk, Document, SearchResult, content_hash
from covey.retrieval.embedder import BUNDLED_NAME, Embedder, EmbedderConfig, EmbedderLike
from covey.retrieval.integrity import VECTORS, partial_sources
from covey.retrieval.length_batching import embed_by_length
from covey.retrieval.loaders import load_paths
from covey.retrieval.search import Reranker, SearchEngine
from covey.retrieval.searcher import DEFAULT_K, DEFAULT_MODE
from covey.retrieval.tokenizers import TokenizerLike, default_tokenizer, tokenizer_name
from covey.retrieval.vector_index import (
    IndexConfig,
    build_index,
    measure_recall,
    to_cpu,
    to_gpu,
)

EMBED_BATCH = 256
# An ingest commits a consistent version after every this many new chunks, or once this
# many seconds passed since its last commit, so a killed or failed ingest keeps its work:
# re-running it re-embeds only what no checkpoint holds.
CHECKPOINT_CHUNKS = 2048
CHECKPOINT_SECONDS = 300.0
# An ingest embeds (length-sorted) and appends this many chunks at a time, at most; the
# checkpoint triggers are checked between such windows.
WINDOW_CHUNKS = 1024
logger = logging.getLogger("covey.retrieval")


@dataclass
class IngestStats:
    """What one add_* call did; `skipped` holds (path, reason) for files not ingested and
    `aliases` (path, the path it resolves to) for files ingested once under another name.

    `embedded_chunks` counts texts sent to the embedder; the other added chunks reused a
    vector the index already held (the same text: a resumed ingest, an unchanged part of a
    changed file). `checkpoints` counts the intermediate commits."""

    documents: int = 0
    unchanged: int = 0
    replaced: int = 0
    added_chunks: int = 0
    removed_chunks: int = 0
    tokens: int = 0
    embedded_chunks: int = 0
    reused_vectors: int = 0
    checkpoints: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)


def _embedder_info(embedder: EmbedderLike) -> dict[str, Any]:
    return {
        "name": embedder.name,
        "dimension": int(embedder.dimension),
        "path": getattr(embedder, "path", None),
    }


class DocumentIndex:
    """Chunks, their vectors, a faiss index and BM25, persisted atomically under `root`.

    Not thread-safe for writers; many processes may read while one writes.
    """

    def __init__(
        self,
        root: Path,
        snapshot: store.Snapshot,
        embedder: EmbedderLike | None,
        tokenizer: TokenizerLike | None,
        index_config: IndexConfig,
    ) -> None:
        self.root = root
        self.manifest = snapshot.manifest
        self.chunker = ChunkerConfig(**snapshot.manifest["chunker"]["config"])
        self.index_config = index_config
        self.chunks: list[Chunk] = snapshot.chunks
        self.sources: dict[str, str] = snapshot.sources
        self._embedder = embedder
        self._tokenizer = tokenizer
        # What opening recovered from (also logged): empty for a healthy index.
        self.warnings: list[str] = list(snapshot.warnings)
        for warning in self.warnings:
            logger.warning("%s", warning)
        # None when vectors.npy is damaged: re-embedded from the chunks on first use (a
        # BM25 search never needs them), see the `vectors` property.
        self._vectors: np.ndarray | None = snapshot.vectors
        self._damaged_vectors = root / "versions" / str(snapshot.manifest.get("version")) / VECTORS
        # Sources whose first chunks a checkpoint holds but whose ingest did not finish:
        # source -> {"content_hash", "chunks"}. Orphaned chunks (left unmarked by an older
        # covey) are treated the same way, so re-running or removing them works.
        self.partial: dict[str, dict[str, Any]] = partial_sources(snapshot.manifest)
        for source, count in snapshot.orphans.items():
            self.partial[source] = {"content_hash": None, "chunks": count}
        self._faiss = None
        if snapshot.faiss_index is not None:  # approximate kinds are stored; move to GPU if any
            self._faiss = to_gpu(snapshot.faiss_index, index_config)
        self._faiss_kind = snapshot.manifest.get("index", {}).get("kind")
        self._faiss_built_n = len(self.chunks) if self._faiss is not None else 0
        self._bm25: BM25Index | None = None
        self._version: str | None = snapshot.manifest.get("version")

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | Path,
        embedder: EmbedderLike | None = None,
        tokenizer: TokenizerLike | None = None,
        chunker: ChunkerConfig | None = None,
        index: IndexConfig | None = None,
    ) -> DocumentIndex:
        """A new empty index, committed at once so it can be opened; fails if one exists."""
        root = Path(root)
        if store.index_exists(root):
            raise RetrievalError(f"an index already exists at {root}; use DocumentIndex.open")
        if root.exists() and not root.is_dir():  # checked before seconds of model loading
            raise RetrievalError(f"{root} is a file, not an index directory")
        embedder = embedder or Embedder.load()
        tokenizer = tokenizer or default_tokenizer()
        chunker = chunker or ChunkerConfig()
        index = index or IndexConfig()
        manifest = {
            "embedder": _embedder_info(embedder),
            "chunker": {"tokenizer": tokenizer_name(tokenizer), "config": asdict(chunker)},
            "index": {"config": asdict(index)},
        }
        vectors = np.zeros((0, embedder.dimension), dtype=np.float32)
        snap = store.Snapshot(manifest, [], {}, vectors)
        self = cls(root, snap, embedder, tokenizer, index)
        self.commit()
        return self

    @classmethod
    def open(
        cls,
        root: str | Path,
        embedder: EmbedderLike | None = None,
        tokenizer: TokenizerLike | None = None,
    ) -> DocumentIndex:
        """Open an existing index; the embedder, if given, must be the one it was built with
        (vectors of two models live in unrelated spaces). Without one it loads lazily.

        Serves the newest committed version after checking its files against its record;
        what could be recovered without loss (a lost manifest, a damaged faiss index or
        vectors file) is, and said in `warnings` and the log. Other damage is a
        RetrievalError naming the file (see covey.retrieval.store)."""
        root = Path(root)
        snap = store.read_snapshot(root)
        built = snap.manifest["embedder"]
        if embedder is not None and (
            embedder.name != built["name"] or int(embedder.dimension) != built["dimension"]
        ):
            raise EmbedderMismatchError(
                f"index {root} was built with embedder {built['name']!r} "
                f"(dimension {built['dimension']}), not {embedder.name!r} (dimension "
                f"{embedder.dimension}); open it without an embedder or rebuild it"
            )
        index_config = IndexConfig(**snap.manifest["index"]["config"])
        self = cls(root, snap, embedder, tokenizer, index_config)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        return self

    @classmethod
    def open_or_create(cls, root: str | Path, **kwargs: Any) -> DocumentIndex:
        if store.index_exists(Path(root)):
            keys = ("embedder", "tokenizer")
            return cls.open(root, **{k: v for k, v in kwargs.items() if k in keys})
        return cls.create(root, **kwargs)

    @property
    def embedder(self) -> EmbedderLike:
        """Loaded on first use: BM25-only searches never pay for the model."""
        if self._embedder is None:
            info = self.manifest["embedder"]
            model = None if info["name"] == BUNDLED_NAME else info.get("path")
            self._embedder = Embedder.load(EmbedderConfig(model=model))
        return self._embedder

    @property
    def tokenizer(self) -> TokenizerLike:
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
            self._check_tokenizer(self._tokenizer)
        return self._tokenizer

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def vectors(self) -> np.ndarray:
        """[len(self), dimension] unit-norm vectors, row i for chunk i."""
        if self._vectors is None:
            self._vectors = self._reembed_damaged()
        return self._vectors

    @vectors.setter
    def vectors(self, value: np.ndarray) -> None:
        self._vectors = value

    def _reembed_damaged(self) -> np.ndarray:
        """Vectors for a version whose vectors.npy is damaged, from its intact chunks; says
        how long it took, since every open repeats it until --repair stores them."""
        logger.warning(
            "%s is damaged: re-embedding its %d chunks from the chunk store",
            self._damaged_vectors,
            len(self.chunks),
        )
        start = time.perf_counter()
        vectors = self._embed_all([c.text for c in self.chunks], progress=None)
        message = (
            f"{self._damaged_vectors}: re-embedded {len(self.chunks)} chunks in "
            f"{time.perf_counter() - start:.1f} s; `covey index --repair {self.root}` stores "
            "them, so that later opens do not repeat this"
        )
        logger.warning("%s", message)
        self.warnings.append(message)
        return vectors

    # ---- ingestion -------------------------------------------------------------------

    def add_files(
        self,
        paths: Sequence[str | Path],
        progress: bool = False,
        checkpoint_chunks: int = CHECKPOINT_CHUNKS,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    ) -> IngestStats:
        """Ingest files and folders; unchanged files add nothing, changed ones are replaced."""
        report = load_paths(list(paths))
        stats = self.add_documents(
            report.documents, progress, checkpoint_chunks, checkpoint_seconds
        )
        stats.skipped, stats.aliases = report.skipped, report.aliases
        return stats

    def add_texts(
        self, texts: Sequence[str], source: str | Sequence[str] | None = None
    ) -> IngestStats:
        """Ingest Python strings. `source` names them (one name, suffixed `#i` when there are
        several texts, or one per text); by default each is named by its content hash."""
        if isinstance(source, str):
            names = [source] if len(texts) == 1 else [f"{source}#{i}" for i in range(len(texts))]
        elif source is None:
            names = [f"text:{content_hash(t)[:16]}" for t in texts]
        else:
            names = list(source)
        if len(names) != len(texts):
            raise RetrievalError(f"got {len(texts)} texts but {len(names)} sources")
        return self.add_documents([Document(t, s) for t, s in zip(texts, names, strict=True)])

    def add_documents(
        self,
        docs: Sequence[Document],
        progress: bool = False,
        checkpoint_chunks: int = CHECKPOINT_CHUNKS,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    ) -> IngestStats:
        """Chunk, embed and index `docs`, committing a consistent version after every
        `checkpoint_chunks` new chunks or `checkpoint_seconds` (None: no time trigger),
        and at the end. Each commit is atomic (see covey.retrieval.store); a crash loses at
        most the work since the last one, and re-running the same ingest reuses the
        vectors the checkpoints hold. A replaced document keeps its old chunks in every
        checkpoint until its new ones start going in. If anything fails midway, the
        in-memory state is reloaded from the last commit before the error propagates."""
        integer = isinstance(checkpoint_chunks, int | np.integer)
        if isinstance(checkpoint_chunks, bool) or not integer or checkpoint_chunks <= 0:
            raise RetrievalError(f"checkpoint_chunks must be > 0, got {checkpoint_chunks!r}")
        if checkpoint_seconds is not None and not checkpoint_seconds > 0:
            raise RetrievalError(
                f"checkpoint_seconds must be > 0 or None, got {checkpoint_seconds!r}"
            )
        try:
            return self._ingest(docs, progress, checkpoint_chunks, checkpoint_seconds)
        except BaseException:
            self._reload()
            raise

    def _reload(self) -> None:
        fresh = DocumentIndex.open(self.root, self._embedder, self._tokenizer)
        self.__dict__.update(fresh.__dict__)

    def _ingest(
        self,
        docs: Sequence[Document],
        progress: bool,
        checkpoint_chunks: int,
        checkpoint_seconds: float | None,
    ) -> IngestStats:
        names = [d.source for d in docs]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise RetrievalError(f"each document needs its own source; repeated: {dupes[:5]}")
        stats = IngestStats(documents=len(docs))
        plan: list[tuple[str, str, list[Chunk]]] = []
        for doc in docs:
            digest = content_hash(doc.text)
            if self.sources.get(doc.source) == digest:
                stats.unchanged += 1
                continue
            plan.append((doc.source, digest, chunk_document(doc, self.tokenizer, self.chunker)))
        replaced = {source for source, _, _ in plan} & self.sources.keys()
        stats.replaced = len(replaced)
        stats.removed_chunks = sum(c.source in replaced for c in self.chunks)
        if not plan:
            return stats
        # Vectors by chunk id (the text's hash), taken before anything is dropped: a resumed
        # or replaced document re-adds many chunks whose text the index already embedded.
        known = {c.id: self.vectors[i] for i, c in enumerate(self.chunks)}
        work = [
            (source, digest, chunk, i == len(chunks) - 1)
            for source, digest, chunks in plan
            for i, chunk in enumerate(chunks)
        ]
        to_embed = {c.id for _, _, c, _ in work} - known.keys()
        step = min(checkpoint_chunks, WINDOW_CHUNKS)
        started: set[str] = set()
        since_commit, last_commit = 0, time.monotonic()
        from tqdm import tqdm

        with tqdm(
            total=len(to_embed), unit="chunk", desc="embedding", disable=not progress
        ) as bar:
            for start in range(0, len(work), step):
                window = work[start : start + step]
                starting = {source for source, _, _, _ in window} - started
                started |= starting
                self._start_sources(starting)
                stats.embedded_chunks += self._embed_missing(window, known, bar.update)
                chunks = [c for _, _, c, _ in window]
                self._append(chunks, np.stack([known[c.id] for c in chunks]))
                self._mark_progress(window)
                since_commit += len(window)
                due = since_commit >= checkpoint_chunks or (
                    checkpoint_seconds is not None
                    and time.monotonic() - last_commit >= checkpoint_seconds
                )
                if due and start + step < len(work):
                    self.commit()
                    stats.checkpoints += 1
                    since_commit, last_commit = 0, time.monotonic()
        self.commit()
        stats.added_chunks = len(work)
        stats.reused_vectors = len(work) - stats.embedded_chunks
        stats.tokens = sum(c.num_tokens for _, _, c, _ in work)
        return stats

    def _start_sources(self, names: set[str]) -> None:
        """The first new chunks of these sources go in now: only now do their old chunks
        (a replaced version, or an interrupted ingest's prefix) and their old digest leave,
        so no checkpoint publishes a document missing both its old and its new text."""
        self._drop_sources(names)
        for name in names:
            self.sources.pop(name, None)
            self.partial.pop(name, None)

    def _embed_missing(self, window, known: dict[str, np.ndarray], on_batch) -> int:
        """Embed the window's texts that have no vector yet (each distinct text once)."""
        texts = {c.id: c.text for _, _, c, _ in window if c.id not in known}
        if texts:
            vectors = self._embed_all(list(texts.values()), on_batch=on_batch)
            known.update(zip(texts, vectors, strict=True))
        return len(texts)

    def _mark_progress(self, window) -> None:
        """Sources whose last chunk is in are complete; the one cut off is partial."""
        for source, digest, _, last in window:
            if last:
                self.sources[source] = digest
                self.partial.pop(source, None)
        source, digest, _, last = window[-1]
        if not last:
            count = sum(c.source == source for c in self.chunks)
            self.partial[source] = {"content_hash": digest, "chunks": count}

    def _check_tokenizer(self, tokenizer: TokenizerLike) -> None:
        """Chunks counted with two tokenizers would mix token budgets: say so, loudly."""
        built, now = self.manifest["chunker"]["tokenizer"], tokenizer_name(tokenizer)
        if built != now:
            logger.warning(
                "index %s was chunked with tokenizer %r, now chunking with %r",
                self.root,
                built,
                now,
            )

    def remove_sources(self, sources: Sequence[str]) -> int:
        """Delete every chunk of these sources and commit; returns how many were removed."""
        names = {s for s in sources if s in self.sources or s in self.partial}
        if not names:
            return 0
        try:
            for name in names:
                self.sources.pop(name, None)
                self.partial.pop(name, None)
            removed = self._drop_sources(names)
            self.commit()
        except BaseException:
            self._reload()
            raise
        return removed

    def _embed_all(
        self, texts: list[str], progress: bool | None = False, on_batch=None
    ) -> np.ndarray:
        """Vectors for `texts` in their order, embedded in batches of similar length;
        `progress` None shows a bar on a terminal only."""
        from tqdm import tqdm

        dim = int(self.manifest["embedder"]["dimension"])
        disable = None if progress is None else not progress
        with tqdm(total=len(texts), unit="chunk", desc="embedding", disable=disable) as bar:
            return embed_by_length(
                self.embedder.embed, texts, dim, EMBED_BATCH, on_batch or bar.update
            )

    def _drop_sources(self, names: set[str]) -> int:
        if not names:
            return 0
        keep = np.array([c.source not in names for c in self.chunks], dtype=bool)
        removed = int((~keep).sum())
        if not removed:
            return 0
        self.chunks = [c for c, k in zip(self.chunks, keep, strict=True) if k]
        self.vectors = self.vectors[keep]
        self._faiss, self._bm25 = None, None  # positions moved: rebuild lazily
        return removed

    def _append(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if not chunks:
            return
        self.chunks.extend(chunks)
        self.vectors = np.concatenate([self.vectors, vectors])
        self._bm25 = None
        if self._faiss is not None and len(self.chunks) <= 2 * self._faiss_built_n:
            self._faiss.add(vectors)  # an approximate index is rebuilt once the data doubles
        else:
            self._faiss = None

    # ---- search ----------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.index_config.resolve_kind(len(self.chunks))

    def faiss_index(self) -> Any:
        """The faiss index, (re)built when missing, stale, or of another kind than the size
        now calls for (auto switches to HNSW past its threshold)."""
        kind = self.kind
        stale = self._faiss is None or self._faiss.ntotal != len(self.chunks)
        if stale or self._faiss_kind != kind:
            self._faiss = build_index(self.vectors, kind, self.index_config)
            self._faiss_kind, self._faiss_built_n = kind, len(self.chunks)
        return self._faiss

    def bm25(self) -> BM25Index:
        if self._bm25 is None:
            self._bm25 = BM25Index([c.text for c in self.chunks])
        return self._bm25

    def search(
        self,
        query: str,
        k: int | None = None,
        mode: str | None = None,
        sources: Sequence[str] | None = None,
        reranker: Reranker | None = None,
    ) -> list[SearchResult]:
        """The k best chunks for `query`, best first (the `Searcher` protocol). `mode`:
        vector, bm25 or hybrid (RRF of both); None keeps DEFAULT_K and DEFAULT_MODE.
        `sources` keeps only chunks from those sources (exact or glob). `reranker`
        (query, chunks) -> scores re-orders a wider candidate list, e.g. a cross-encoder."""
        k = k if k is not None else DEFAULT_K
        mode = mode if mode is not None else DEFAULT_MODE
        return SearchEngine(self).search(query, k, mode, sources, reranker)

    # ---- persistence -----------------------------------------------------------------

    def commit(self) -> None:
        """Persist the current state as a new version (see covey.retrieval.store)."""
        self._commit()

    def _commit(self, repair: bool = False) -> None:
        kind = self.kind
        index_info: dict[str, Any] = {"config": asdict(self.index_config), "kind": kind}
        faiss_to_save = None
        if kind != "flat" and self.chunks:
            faiss_to_save = to_cpu(self.faiss_index())
            index_info["recall_at_10"] = round(measure_recall(self._faiss, self.vectors), 4)
        manifest = {k: v for k, v in self.manifest.items() if k != "partial"}
        if self.partial:
            manifest["partial"] = dict(sorted(self.partial.items()))
        manifest = dict(
            manifest,
            index=index_info,
            num_chunks=len(self.chunks),
            num_sources=len(self.sources),
            num_tokens=sum(c.num_tokens for c in self.chunks),
            updated=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        snap = store.Snapshot(manifest, self.chunks, self.sources, self.vectors, faiss_to_save)
        self._version = store.commit_snapshot(self.root, snap, self._version, repair)
        self.manifest = snap.manifest
