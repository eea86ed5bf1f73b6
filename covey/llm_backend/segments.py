"""Prompts as segments: static text, retrieved chunks and dynamic input, tagged by kind.

The engine concatenates segments into one token sequence but remembers where each one
lies, so the chunk KV store and the optimizer can address them later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from covey.errors import InvalidRequestError
from covey.llm_backend.token_ids import as_token_ids

SegmentKind = Literal["static", "chunk", "dynamic"]


@dataclass(frozen=True)
class Segment:
    """A piece of a prompt: give `text` or `token_ids`; `chunk_id` names a retrieved chunk."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    kind: SegmentKind = "dynamic"
    chunk_id: str | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.token_ids is None):
            raise InvalidRequestError("a Segment needs exactly one of text or token_ids")
        if self.kind not in ("static", "chunk", "dynamic"):
            raise InvalidRequestError(
                f"Segment.kind must be 'static', 'chunk' or 'dynamic', got {self.kind!r}"
            )
        if self.text is not None and not isinstance(self.text, str):
            raise InvalidRequestError(f"Segment.text must be a str, got {self.text!r}")
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", as_token_ids("Segment.token_ids", self.token_ids))
        if self.chunk_id is not None and not isinstance(self.chunk_id, str):
            raise InvalidRequestError(f"Segment.chunk_id must be a str, got {self.chunk_id!r}")


@dataclass(frozen=True)
class SegmentSpan:
    """Where a segment landed in the sequence: tokens `[start, end)`."""

    kind: SegmentKind
    start: int
    end: int
    chunk_id: str | None = None
