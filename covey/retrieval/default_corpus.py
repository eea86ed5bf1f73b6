"""The default corpus: CPython's own documentation topics (`pydoc_data.topics`), indexed on
first use so a fresh install has something real to retrieve from with no download."""

from __future__ import annotations

from pathlib import Path

from covey.errors import InvalidRequestError
from covey.home import covey_home
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.retrieval.embedder import EmbedderLike
from covey.retrieval.store import index_exists
from covey.retrieval.tokenizers import TokenizerLike

SOURCE_PREFIX = "pydoc:"
# The name the built-in apps retrieve from and the CLI binds the default index to.
DEFAULT_INDEX_NAME = "pydocs"


def default_index_dir() -> Path:
    return covey_home() / "indexes" / DEFAULT_INDEX_NAME


def pydoc_documents(limit: int | None = None) -> list[Document]:
    """One Document per pydoc topic (sorted by name, so `limit` is deterministic)."""
    if limit is not None and limit <= 0:
        raise InvalidRequestError(f"limit must be > 0 or None, got {limit}")
    from pydoc_data.topics import topics

    names = sorted(topics)[:limit]
    return [Document(text=topics[name], source=f"{SOURCE_PREFIX}{name}") for name in names]


def ensure_default_index(
    root: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    embedder: EmbedderLike | None = None,
    tokenizer: TokenizerLike | None = None,
) -> DocumentIndex:
    """Open the Python-docs index, building it first if it does not exist yet.

    `limit` ingests only the first topics (tests); a complete build is what users get.
    """
    root = Path(root) if root is not None else default_index_dir()
    if index_exists(root):  # also one whose manifest is lost: open() recovers it
        return DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    index = DocumentIndex.create(root, embedder=embedder, tokenizer=tokenizer)
    docs = pydoc_documents(limit)
    if progress:
        print(f"covey: building the Python docs index at {root} ({len(docs)} topics)")
    index.add_documents(docs, progress=progress)
    return index
