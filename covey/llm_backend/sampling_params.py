"""Sampling parameters: defined once, passed as one object everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from covey.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; `temperature == 0` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    choices: tuple[str, ...] = ()  # the output is exactly one of these (max_tokens not used)

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the object hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.choices, str):
            raise InvalidRequestError("choices must be a list of strings, not one string")
        object.__setattr__(self, "choices", tuple(self.choices))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(
                f"max_tokens must be a positive integer, got {self.max_tokens!r}"
            )
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
        if any(not isinstance(c, str) or not c for c in self.choices):
            raise InvalidRequestError("choices must be non-empty strings")
        if len(set(self.choices)) != len(self.choices):
            raise InvalidRequestError(f"choices must differ, got {list(self.choices)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
