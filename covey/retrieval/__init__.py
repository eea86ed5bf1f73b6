"""Retrieval: ingestion, chunking, embeddings, a persistent faiss index, hybrid search.

Names resolve lazily so `import covey.retrieval` does not import torch or faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Chunk": "covey.retrieval.documents",
    "Document": "covey.retrieval.documents",
    "SearchResult": "covey.retrieval.documents",
    "ChunkerConfig": "covey.retrieval.chunker",
    "chunk_document": "covey.retrieval.chunker",
    "Embedder": "covey.retrieval.embedder",
    "EmbedderConfig": "covey.retrieval.embedder",
    "IndexConfig": "covey.retrieval.vector_index",
    "DocumentIndex": "covey.retrieval.document_index",
    "IngestStats": "covey.retrieval.document_index",
    "Retriever": "covey.retrieval.retriever",
    "RetrieverConfig": "covey.retrieval.retriever",
    "ensure_default_index": "covey.retrieval.default_corpus",
    "load_paths": "covey.retrieval.loaders",
}

if TYPE_CHECKING:
    from covey.retrieval.chunker import ChunkerConfig, chunk_document
    from covey.retrieval.default_corpus import ensure_default_index
    from covey.retrieval.document_index import DocumentIndex, IngestStats
    from covey.retrieval.documents import Chunk, Document, SearchResult
    from covey.retrieval.embedder import Embedder, EmbedderConfig
    from covey.retrieval.loaders import load_paths
    from covey.retrieval.retriever import Retriever, RetrieverConfig
    from covey.retrieval.vector_index import IndexConfig

__all__ = [
    "Chunk",
    "ChunkerConfig",
    "Document",
    "DocumentIndex",
    "Embedder",
    "EmbedderConfig",
    "IndexConfig",
    "IngestStats",
    "Retriever",
    "RetrieverConfig",
    "SearchResult",
    "chunk_document",
    "ensure_default_index",
    "load_paths",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'covey.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
