from __future__ import annotations

import itertools
import sys
import types

import pytest

from covey.errors import ConfigError
from covey.retrieval.chunker import ChunkerConfig, chunk_document
from covey.retrieval.documents import Document, content_hash
from covey.retrieval.tokenizers import WhitespaceTokenizer, default_tokenizer

PROSE = " ".join(f"Sentence number {i} talks about topic {i % 7} and ends here." for i in range(60))


def test_chunks_cover_offsets_and_respect_budget(tokenizer):
    doc = Document(PROSE, "prose.txt")
    config = ChunkerConfig(chunk_tokens=40, overlap_tokens=16)  # > one sentence
    chunks = chunk_document(doc, tokenizer, config)
    assert len(chunks) > 5
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        assert c.num_tokens == len(tokenizer.encode(c.text)) <= 40
        assert c.id == content_hash(c.text)
        assert c.text.endswith("here.")  # sentence-aware: never cut mid-sentence
    assert chunks[0].start == 0 and chunks[-1].end == len(doc.text)
    # overlap: each chunk starts before the previous one ends
    assert all(b.start < a.end for a, b in itertools.pairwise(chunks))
    assert all(b.start > a.start for a, b in itertools.pairwise(chunks))


def test_no_overlap_tiles_text():
    doc = Document(PROSE, "p")
    chunks = chunk_document(doc, WhitespaceTokenizer(), ChunkerConfig(30, 0))
    assert all(b.start >= a.end for a, b in itertools.pairwise(chunks))
    joined = "".join(c.text for c in chunks).replace(" ", "")
    assert joined == PROSE.replace(" ", "")


def test_ids_are_source_independent_and_stable(tokenizer):
    config = ChunkerConfig(chunk_tokens=32, overlap_tokens=0)
    a = chunk_document(Document(PROSE, "a.txt"), tokenizer, config)
    b = chunk_document(Document(PROSE, "b.txt"), tokenizer, config)
    assert [c.id for c in a] == [c.id for c in b]
    assert {c.source for c in b} == {"b.txt"}


def test_oversized_sentence_and_word_are_split(tokenizer):
    text = "word " * 300 + "x" * 2000
    chunks = chunk_document(Document(text, "long"), tokenizer, ChunkerConfig(50, 0))
    assert all(c.num_tokens <= 50 for c in chunks)
    assert chunks[-1].end == len(text.rstrip())
    assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_blank_document_gives_no_chunks(tokenizer):
    assert chunk_document(Document("  \n\n  ", "blank"), tokenizer, ChunkerConfig()) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"overlap_tokens": -1}, "overlap_tokens"),
        ({"chunk_tokens": 10, "overlap_tokens": 10}, "overlap_tokens"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ChunkerConfig(**kwargs)


def test_default_tokenizer_uses_the_engine_lazily(monkeypatch):
    """Once covey.llm_backend.tokenizer exists, chunking counts the serving model's tokens."""
    fake = types.ModuleType("covey.llm_backend.tokenizer")
    sentinel = WhitespaceTokenizer()
    fake.load_default_tokenizer = lambda: sentinel
    monkeypatch.setitem(sys.modules, "covey.llm_backend.tokenizer", fake)
    assert default_tokenizer() is sentinel


def test_default_tokenizer_is_the_serving_models():
    from covey.llm_backend.tokenizer import load_default_tokenizer

    assert default_tokenizer() is load_default_tokenizer()


def test_tokenizer_name_is_independent_of_file_location(tmp_path):
    """Manifests compare this label; a path in it would differ between machines."""
    from transformers import AutoTokenizer

    from covey.retrieval.embedder import bundled_model_dir
    from covey.retrieval.tokenizers import HFTokenizerAdapter, tokenizer_name

    copy = tmp_path / "elsewhere"
    copy.symlink_to(bundled_model_dir(), target_is_directory=True)
    a = HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(bundled_model_dir())))
    b = HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(copy)))
    assert tokenizer_name(a) == tokenizer_name(b)
    assert tokenizer_name(a).endswith(tuple("0123456789abcdef")) and ":30522:" in a.name
    assert tokenizer_name(WhitespaceTokenizer()) == "whitespace"
