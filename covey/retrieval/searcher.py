"""`Searcher`: what the runtime calls to retrieve, and the one place search options are
checked.

`DocumentIndex` and `Retriever` implement it, and so can any user object (a remote vector
store). `k` and `mode` left as None mean the searcher's own settings (a `Retriever`'s
config, a `DocumentIndex`'s defaults); a value given overrides them, and a plan says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from covey.checks import as_int
from covey.errors import InvalidRequestError
from covey.retrieval.documents import SearchResult

MODES = ("vector", "bm25", "hybrid")
DEFAULT_K = 5
DEFAULT_MODE = "hybrid"


def check_k(k: object) -> int:
    """`k` as a positive int (numpy integers accepted), else InvalidRequestError."""
    return as_int("k", k, ge=1)


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return str(mode)


@runtime_checkable
class Searcher(Protocol):
    def search(
        self,
        query: str,
        k: int | None = None,
        mode: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[SearchResult]:
        """The best chunks for `query`, best first; None keeps the searcher's own k/mode."""
        ...
