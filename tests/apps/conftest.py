"""The real embedded model, the real MiniLM embedder and a tiny Python-docs-like index.

The index holds five short documents, built once per session, and is bound under the
apps' index name, as the Python docs index would be.
"""

from __future__ import annotations

import pytest

from covey.llm_backend.async_llm import AsyncLLM
from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.runtime import Runtime
from tests.retrieval.conftest import embedder, tokenizer  # noqa: F401  (session fixtures)
from tests.runtime.conftest import make_cpu_engine, real_llm  # noqa: F401

DOCS = {
    "pydoc:for": (
        "The for statement iterates over the items of a sequence such as a list, tuple or "
        "string, or any other iterable object. The loop body runs once per item, with the "
        "item bound to the target variable."
    ),
    "pydoc:with": (
        "The with statement wraps a block in the methods of a context manager: __enter__ "
        "runs before the block and __exit__ after it, even when the block raises. Open files "
        "with a with statement so they are always closed."
    ),
    "pydoc:dict": (
        "A dictionary maps hashable keys to values. Look a value up with d[key]; a missing "
        "key raises KeyError, so use d.get(key, default) to get a default instead."
    ),
    "pydoc:try": (
        "The try statement specifies exception handlers. An except clause catches exceptions "
        "of a matching class; a finally clause always runs, whether or not an exception "
        "occurred."
    ),
    "pydoc:lambda": (
        "Lambda expressions create anonymous functions: lambda x: x + 1 is a function of one "
        "argument that returns the argument plus one."
    ),
}


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, embedder, tokenizer):  # noqa: F811
    index = DocumentIndex.create(
        tmp_path_factory.mktemp("apps") / "pydocs",
        embedder=embedder,
        tokenizer=tokenizer,
        chunker=ChunkerConfig(chunk_tokens=64, overlap_tokens=8),
    )
    index.add_documents([Document(text, source) for source, text in DOCS.items()])
    return index


@pytest.fixture
def runtime(real_llm, tiny_index):  # noqa: F811
    return Runtime(real_llm, retrievers={DEFAULT_INDEX_NAME: tiny_index})


def fresh_runtime(index: DocumentIndex, **kwargs) -> tuple[AsyncLLM, Runtime]:
    """A runtime on a new engine (empty prefix cache); the caller closes the llm."""
    llm = AsyncLLM(engine=make_cpu_engine())
    return llm, Runtime(llm, retrievers={DEFAULT_INDEX_NAME: index}, **kwargs)
