"""Tokenizers the chunker can count with: the serving model's, a Hugging Face one, or words.

Chunks are sized in the serving model's tokens because that is the budget they spend in a
prompt; anything with `encode(text) -> list[int]` and `decode(ids) -> str` works.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Protocol


class TokenizerLike(Protocol):
    """What the chunker needs: `encode` adds no special tokens."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class WhitespaceTokenizer:
    """One token per run of non-space characters; for tests and tokenizer-free setups."""

    name = "whitespace"

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in re.findall(r"\S+", text):
            if word not in self._vocab:
                self._vocab[word] = len(self._words)
                self._words.append(word)
            ids.append(self._vocab[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids)


class HFTokenizerAdapter:
    """Wraps a transformers tokenizer so `encode` never adds [CLS]/<s> and friends."""

    def __init__(self, hf_tokenizer: Any, name: str | None = None) -> None:
        self.hf = hf_tokenizer
        self.name = name or hf_fingerprint(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def hf_fingerprint(hf: Any) -> str:
    """Class, vocabulary size and a hash of the vocabulary: the same tokenizer gets the same
    label wherever its files live (paths differ between machines and cache states)."""
    vocab = hf.get_vocab()
    digest = hashlib.sha256()
    for token, token_id in sorted(vocab.items()):
        digest.update(f"{token}\t{token_id}\n".encode())
    return f"{type(hf).__name__}:{len(vocab)}:{digest.hexdigest()[:16]}"


def tokenizer_name(tokenizer: Any) -> str:
    """A label recorded in the manifest so a reader knows what `num_tokens` counts."""
    name = getattr(tokenizer, "name", None)
    if isinstance(name, str) and name:
        return name
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and hasattr(hf, "get_vocab"):
        return hf_fingerprint(hf)
    return type(tokenizer).__name__


def default_tokenizer() -> TokenizerLike:
    """The serving model's tokenizer, loaded lazily so `covey.retrieval` imports stay cheap."""
    from covey.llm_backend.tokenizer import load_default_tokenizer

    return load_default_tokenizer()
