"""What the engine hands back per request and step."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import overload

from covey.llm_backend.sequence import Sequence


class TokenIds(SequenceABC[int]):
    """A read-only window `[start, end)` of a sequence's token list, fixed when made.

    Every step hands back the whole output so far; copying it each time made a long
    generation quadratic. A sequence's token list only ever grows, so a window over it
    stays what it was when the step ended, without a copy. It compares equal to any list
    or tuple of the same ids; slicing gives a list.
    """

    __slots__ = ("_ids", "_start", "_end")

    def __init__(self, ids: list[int], start: int = 0, end: int | None = None) -> None:
        self._ids = ids
        self._start = start
        self._end = len(ids) if end is None else end

    def __len__(self) -> int:
        return self._end - self._start

    def __reduce__(self) -> tuple:
        """Pickled as its own ids only: a Ray replica streams every step's output to the
        front, and the whole sequence (prompt included) each time would be most of it."""
        return (TokenIds, (self._ids[self._start : self._end],))

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return self._ids[self._start : self._end][index]
        n = len(self)
        if not -n <= index < n:
            raise IndexError("token index out of range")
        return self._ids[self._start + index % n]

    def __iter__(self) -> Iterator[int]:
        for i in range(self._start, self._end):
            yield self._ids[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenIds):
            other = list(other)
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return len(other) == len(self) and self._ids[self._start : self._end] == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return repr(self._ids[self._start : self._end])


@dataclass(frozen=True)
class RequestMetrics:
    """Seconds, measured with perf_counter; None until the event happened."""

    queue_time: float | None
    ttft: float | None
    tpot: float | None
    latency: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    num_reused_tokens: int = 0  # prompt tokens whose KV came from the chunk store
    num_recomputed_tokens: int = 0  # of the blended ones, recomputed on every layer

    @classmethod
    def of(cls, seq: Sequence) -> RequestMetrics:
        m = seq.metrics
        queue = m.first_scheduled_time - m.arrival_time if m.first_scheduled_time else None
        ttft = m.first_token_time - m.arrival_time if m.first_token_time else None
        end = m.finished_time
        n = seq.num_output_tokens
        tpot = (
            (end - m.first_token_time) / (n - 1) if end and m.first_token_time and n > 1 else None
        )
        return cls(
            queue_time=queue,
            ttft=ttft,
            tpot=tpot,
            latency=end - m.arrival_time if end else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=n,
            num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions,
            num_reused_tokens=m.num_reused_tokens,
            num_recomputed_tokens=m.num_recomputed_tokens,
        )


@dataclass(frozen=True)
class RequestOutput:
    """The state of one request after a step: the whole output so far plus this step's delta.

    A request that failed inside the engine finishes with reason "error" and `error` saying
    why; the requests that ran beside it are not affected. `choice_logprobs`: for choices
    scored as whole options, every option (in the caller's order) -> log P(option | prompt),
    the sum over its tokens; None otherwise. The pick is not always the best of these: an
    option whose tokens begin another's ranks by P(it and not the longer one's rest)
    (option_scoring.py), so with `length_normalize=False` it can lose with the higher one.
    `healed_text`: the text token healing took off the prompt's end ("" when none): the
    first output token starts with it, `text` does not.
    """

    request_id: str
    text: str
    token_ids: SequenceABC[int]  # the output ids so far: a TokenIds window, not a copy
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None
    choice_logprobs: dict[str, float] | None = None
    healed_text: str = ""
