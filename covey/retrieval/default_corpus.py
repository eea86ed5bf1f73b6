"""The default corpus: the Python documentation that ships inside CPython, indexed on first
use so a fresh install has something real to retrieve from with no download.

It is pydoc's topics (`pydoc_data.topics`: the language reference, `for`, `with`, ...) plus
the docstrings of the builtins and of the commonly used standard-library modules
(covey.retrieval.stdlib_docs), one document per function, class and method.

The manifest records which corpus definition an index holds (`corpus`: CORPUS_VERSION,
the Python version the docstrings came from, and the `limit` it was built with, None for
the whole corpus). An index built from another definition, whose first build was
interrupted, or that holds only the first documents while the whole corpus is asked for,
is brought up to date in place on the next open: the documents that did not change keep
their vectors, new and changed ones are embedded, and ones the corpus no longer has are
removed. The default index (`default_index_dir`) is what `covey chat`, `covey search` and
the server open, so it is always built whole: `limit` is refused there.
"""

from __future__ import annotations

import fcntl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from covey.errors import InvalidRequestError, RetrievalError
from covey.home import covey_home
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.retrieval.embedder import EmbedderLike
from covey.retrieval.stdlib_docs import MODULES, SOURCE_PREFIX, stdlib_documents
from covey.retrieval.store import index_exists
from covey.retrieval.tokenizers import TokenizerLike

# The name the built-in apps retrieve from and the CLI binds the default index to.
DEFAULT_INDEX_NAME = "pydocs"
CORPUS_NAME = "python-docs"
# Bump whenever what default_documents returns changes for reasons other than the Python
# version: 1 was pydoc's topics alone (indexes written before the manifest had `corpus`),
# 2 adds the docstrings of the builtins and of stdlib_docs.MODULES.
CORPUS_VERSION = 2
# Held (flock) by the process building or updating the index, in the index's folder.
BUILD_LOCK = ".corpus-build.lock"


def default_index_dir() -> Path:
    return covey_home() / "indexes" / DEFAULT_INDEX_NAME


def corpus_identity() -> dict[str, Any]:
    """What the manifest's `corpus` records; an index whose record differs is updated."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"name": CORPUS_NAME, "version": CORPUS_VERSION, "python": python}


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise InvalidRequestError(f"limit must be > 0 or None, got {limit}")


def pydoc_documents(limit: int | None = None) -> list[Document]:
    """One Document per pydoc topic (sorted by name, so `limit` is deterministic)."""
    _check_limit(limit)
    from pydoc_data.topics import topics

    names = sorted(topics)[:limit]
    return [Document(text=topics[name], source=f"{SOURCE_PREFIX}{name}") for name in names]


def default_documents(limit: int | None = None) -> list[Document]:
    """The whole default corpus: the pydoc topics, then the stdlib docstrings in module
    order. `limit` keeps the first documents only (tests and quick benchmarks)."""
    _check_limit(limit)
    docs = pydoc_documents()
    if limit is None or limit > len(docs):
        docs += stdlib_documents()
    return docs[:limit]


def corpus_is_current(manifest: dict[str, Any], limit: int | None = None) -> bool:
    """True when the index holds this corpus definition, completely built, and at least the
    documents a call with `limit` asks for: a whole-corpus build serves any limit, a build
    with limit N serves a limit up to N, never a call for the whole corpus."""
    recorded = manifest.get("corpus")
    if not isinstance(recorded, dict) or "limit" not in recorded:
        return False  # no record, or one that does not say whether it is complete
    if not all(recorded.get(key) == value for key, value in corpus_identity().items()):
        return False
    built = recorded["limit"]
    return built is None or (limit is not None and limit <= built)


def _describe(manifest: dict[str, Any]) -> str:
    recorded = manifest.get("corpus")
    if not isinstance(recorded, dict):
        return "an older corpus definition (or an interrupted build)"
    held = f"corpus version {recorded.get('version')} on Python {recorded.get('python')}"
    if "limit" not in recorded:
        return f"{held}, from a covey that did not record whether the build was whole"
    if recorded["limit"] is not None:
        return f"{held}, only its first {recorded['limit']} documents"
    return held


def _check_root(root: Path, limit: int | None) -> None:
    """A partial build of the default index would be what every later `covey chat`,
    `covey search` and server start searches; keep partial builds in a folder of their own."""
    if limit is not None and root.resolve() == default_index_dir().resolve():
        raise InvalidRequestError(
            f"limit={limit} builds a partial index, but {root} is the default index, which "
            "covey chat, covey search and the server search as the whole corpus; pass "
            "root= a folder of your own for a partial build"
        )


def ensure_default_index(
    root: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    embedder: EmbedderLike | None = None,
    tokenizer: TokenizerLike | None = None,
) -> DocumentIndex:
    """Open the Python-docs index, building it first if it does not exist yet, or updating
    it if it holds another corpus definition (see the module docstring).

    `limit` ingests only the first documents (tests, quick benchmarks), into a `root` of
    the caller's own: the default index is always built whole. An index of this definition
    is opened as it is when it holds at least what `limit` asks for (a whole build serves
    any limit); a partial one is completed for a call that asks for more. The index is
    covey's: updating it removes any document not in the corpus (or beyond `limit`).
    """
    _check_limit(limit)
    root = Path(root) if root is not None else default_index_dir()
    _check_root(root, limit)
    index = _open(root, embedder, tokenizer)
    if index is not None and corpus_is_current(index.manifest, limit):
        return index
    with _build_lock(root, progress):
        # another process (a second server worker, `covey search` next to `covey serve`)
        # may have built or updated it while this one waited: then it is current now
        index = _open(root, embedder, tokenizer)
        if index is not None and corpus_is_current(index.manifest, limit):
            return index
        return _build(root, index, limit, progress, embedder, tokenizer)


def _open(
    root: Path, embedder: EmbedderLike | None, tokenizer: TokenizerLike | None
) -> DocumentIndex | None:
    if not index_exists(root):  # also true of one whose manifest is lost: open() recovers it
        return None
    return DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)


@contextmanager
def _build_lock(root: Path, progress: bool) -> Iterator[None]:
    """Let one process at a time build or update the index at `root`; the others wait, then
    find it current. The store's commit lock only serializes single commits, so without this
    two processes would both ingest and the second commit would fail (the index changed
    under it), or both create it and the second would find it exists."""
    if root.exists() and not root.is_dir():
        raise RetrievalError(f"{root} is a file, not an index directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(root / BUILD_LOCK, "a")  # noqa: SIM115 -- closed below, after the unlock
    except OSError as exc:
        raise RetrievalError(
            f"cannot use {root} for the Python docs index: {exc.strerror or exc}"
        ) from exc
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(
                    f"covey: another process is building the Python docs index at {root}; "
                    "waiting for it"
                )
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(
    root: Path,
    index: DocumentIndex | None,
    limit: int | None,
    progress: bool,
    embedder: EmbedderLike | None,
    tokenizer: TokenizerLike | None,
) -> DocumentIndex:
    """Update `index` (None: create it) to hold the corpus, up to `limit` documents."""
    if index is not None:
        docs = default_documents(limit)  # after the check: imports ~50 modules
        if progress:
            print(
                f"covey: the Python docs index at {root} holds {_describe(index.manifest)}; "
                f"updating it to corpus version {CORPUS_VERSION} ({len(docs)} documents; "
                "unchanged ones keep their vectors)"
            )
    else:
        index = DocumentIndex.create(root, embedder=embedder, tokenizer=tokenizer)
        docs = default_documents(limit)
        if progress:
            topics = len(pydoc_documents(limit))
            print(
                f"covey: building the Python docs index at {root} ({len(docs)} documents: "
                f"{topics} pydoc topics, {len(docs) - topics} docstrings of the builtins and "
                f"{len(MODULES) - 1} stdlib modules); this runs once"
            )
    fill_index(index, docs, progress, limit)
    return index


def fill_index(
    index: DocumentIndex, docs: list[Document], progress: bool = False, limit: int | None = None
) -> None:
    """Make `index` hold exactly `docs`, then record the corpus identity and `limit`, the
    limit `docs` were taken with (None: they are the whole corpus), so that a partial
    index is never trusted as whole. The record is committed last, so an interrupted fill
    is resumed (not trusted) by the next open."""
    index.add_documents(docs, progress=progress)
    wanted = {doc.source for doc in docs}
    index.remove_sources(sorted((index.sources.keys() | index.partial.keys()) - wanted))
    index.manifest["corpus"] = dict(corpus_identity(), documents=len(docs), limit=limit)
    index.commit()
