"""Shared fixtures: the real bundled embedder and a real tokenizer, loaded once per session."""

from __future__ import annotations

import pytest

from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.embedder import Embedder, bundled_model_dir
from covey.retrieval.tokenizers import HFTokenizerAdapter


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder.load()


@pytest.fixture(scope="session")
def tokenizer() -> HFTokenizerAdapter:
    """The MiniLM word-piece tokenizer: a real subword tokenizer available offline, standing
    in for the serving model's until covey.llm_backend.tokenizer ships."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    return HFTokenizerAdapter(hf, "all-MiniLM-L6-v2")


@pytest.fixture
def make_index(tmp_path, embedder, tokenizer):
    """Create a fresh index in tmp_path; keyword arguments go to DocumentIndex.create."""

    def make(name: str = "idx", **kwargs) -> DocumentIndex:
        kwargs.setdefault("chunker", ChunkerConfig(chunk_tokens=64, overlap_tokens=8))
        return DocumentIndex.create(
            tmp_path / name, embedder=embedder, tokenizer=tokenizer, **kwargs
        )

    return make
