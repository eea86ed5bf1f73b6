"""DocumentIndex: the user-facing retrieval API over a persistent index directory.

Typical use:
    index = DocumentIndex.create("idx")  # or DocumentIndex.open("idx")
    index.add_files(["docs/"])  # each add_* call is one atomic commit
    index.search("how do I sort a dict", k=5, mode="hybrid", sources=[...])
"""

from __future__ import annotations

import datetime as dt
import logging
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
logger = logging.getLogger("covey.retrieval")


@dataclass
class IngestStats:
    """What one add_* call did; `skipped` holds (path, reason) for files not ingested."""

    documents: int = 0
    unchanged: int = 0
    replaced: int = 0
    added_chunks: int = 0
    removed_chunks: int = 0
    tokens: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
        self.vectors: np.ndarray = snapshot.vectors
        self._embedder = embedder
        self._tokenizer = tokenizer
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
        if (root / store.MANIFEST).exists():
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
        (vectors of two models live in unrelated spaces). Without one it loads lazily."""
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
        if (Path(root) / store.MANIFEST).exists():
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

    # ---- ingestion -------------------------------------------------------------------

    def add_files(self, paths: Sequence[str | Path], progress: bool = False) -> IngestStats:
        """Ingest files and folders; unchanged files add nothing, changed ones are replaced."""
        report = load_paths(list(paths))
        stats = self.add_documents(report.documents, progress=progress)
        stats.skipped = report.skipped
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

    def add_documents(self, docs: Sequence[Document], progress: bool = False) -> IngestStats:
        """Chunk, embed and index `docs`, then commit once; nothing is visible on disk (and a
        crash changes nothing) until the commit's manifest swap. If anything fails midway,
        the in-memory state is reloaded from the last commit before the error propagates."""
        try:
            return self._ingest(docs, progress)
        except BaseException:
            self._reload()
            raise

    def _reload(self) -> None:
        fresh = DocumentIndex.open(self.root, self._embedder, self._tokenizer)
        self.__dict__.update(fresh.__dict__)

    def _ingest(self, docs: Sequence[Document], progress: bool) -> IngestStats:
        names = [d.source for d in docs]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise RetrievalError(f"each document needs its own source; repeated: {dupes[:5]}")
        stats = IngestStats(documents=len(docs))
        new_chunks: list[Chunk] = []
        replaced: list[str] = []
        for doc in docs:
            digest = content_hash(doc.text)
            if self.sources.get(doc.source) == digest:
                stats.unchanged += 1
                continue
            if doc.source in self.sources:
                replaced.append(doc.source)
            self.sources[doc.source] = digest
            new_chunks.extend(chunk_document(doc, self.tokenizer, self.chunker))
        stats.replaced = len(replaced)
        stats.removed_chunks = self._drop_sources(set(replaced))
        if new_chunks or replaced:
            vectors = self._embed([c.text for c in new_chunks], progress)
            self._append(new_chunks, vectors)
            self.commit()
        stats.added_chunks = len(new_chunks)
        stats.tokens = sum(c.num_tokens for c in new_chunks)
        return stats

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
        names = {s for s in sources if s in self.sources}
        if not names:
            return 0
        try:
            for name in names:
                del self.sources[name]
            removed = self._drop_sources(names)
            self.commit()
        except BaseException:
            self._reload()
            raise
        return removed

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), unit="chunk", desc="embedding", disable=not progress)
        parts = [np.zeros((0, int(self.manifest["embedder"]["dimension"])), np.float32)]
        with bar:
            for i in range(0, len(texts), EMBED_BATCH):
                parts.append(self.embedder.embed(texts[i : i + EMBED_BATCH]))
                bar.update(len(parts[-1]))
        return np.concatenate(parts)

    def _drop_sources(self, names: set[str]) -> int:
        if not names:
            return 0
        keep = np.array([c.source not in names for c in self.chunks], dtype=bool)
        removed = int((~keep).sum())
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
        kind = self.kind
        index_info: dict[str, Any] = {"config": asdict(self.index_config), "kind": kind}
        faiss_to_save = None
        if kind != "flat" and self.chunks:
            faiss_to_save = to_cpu(self.faiss_index())
            index_info["recall_at_10"] = round(measure_recall(self._faiss, self.vectors), 4)
        manifest = dict(
            self.manifest,
            index=index_info,
            num_chunks=len(self.chunks),
            num_sources=len(self.sources),
            num_tokens=sum(c.num_tokens for c in self.chunks),
            updated=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        snap = store.Snapshot(manifest, self.chunks, self.sources, self.vectors, faiss_to_save)
        self._version = store.commit_snapshot(self.root, snap, self._version)
        self.manifest = snap.manifest
