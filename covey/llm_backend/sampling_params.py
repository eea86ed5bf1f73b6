"""Sampling parameters: defined once, validated once, passed as one object everywhere.

Every field is checked here, at the edge, so a bad value is an `InvalidRequestError` naming
the field when the request is made, never an exception deep inside an engine step (where it
would take the requests batched beside it down too). Token ids are checked against the
model's vocabulary when the request is added (the vocabulary is the engine's to know).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from covey.checks import as_int, as_real
from covey.errors import InvalidRequestError
from covey.llm_backend.token_ids import as_token_ids

# Temperatures below this sample greedily (as vLLM does): dividing logits by a denormal
# such as 1e-45 overflows to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
CHOICE_SCORINGS = ("auto", "whole", "trie")  # see option_scoring.py for when each is used


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature` below GREEDY_TEMPERATURE (1e-5), 0 included, means greedy decoding.
    Integers may be any integral type (numpy integers too) and are stored as `int`; lists
    are stored as tuples, so the object stays hashable and immutable.
    """

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
    # How choices are picked: "whole" scores every option's full continuation, "trie"
    # picks token by token, "auto" takes the trie only for many long options.
    choice_scoring: str = "auto"
    # Whole-option scoring ranks options by their mean log-probability per token (True)
    # or by their total log-probability (False); an option whose tokens begin another's
    # counts only what does not continue into the longer one (option_scoring.py).
    length_normalize: bool = True
    # Back the prompt up one token and make the output start with the removed text, so a
    # prompt ending inside a token (a trailing space) does not derail the generation.
    token_healing: bool = False
    # Tool calls: a turn that ends pauses the request instead of finishing it (its last
    # output has finished=False, finish_reason "paused"); the caller resumes it with the
    # tool's result on the same context. `pause_on_stop`: only when a stop string or a
    # stop token id ended it (the stop text stays in the context the model sees on resume,
    # whatever include_stop_str_in_output says about the visible text). `pause_at_end`:
    # whatever ended it (stop, EOS, max_tokens), except abort and errors.
    pause_on_stop: bool = False
    pause_at_end: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "max_tokens", as_int("max_tokens", self.max_tokens, ge=1))
        set_(self, "temperature", as_real("temperature", self.temperature, ge=0))
        set_(self, "top_p", as_real("top_p", self.top_p, gt=0, le=1))
        set_(self, "top_k", as_int("top_k", self.top_k, ge=0, note=" (0 disables it)"))
        if self.seed is not None:
            set_(self, "seed", as_int("seed", self.seed, ge=SEED_RANGE[0], lt=SEED_RANGE[1]))
        set_(self, "stop", _strings("stop", self.stop, one_allowed=True))
        set_(self, "choices", _strings("choices", self.choices, one_allowed=False))
        if len(set(self.choices)) != len(self.choices):
            raise InvalidRequestError(f"choices must differ, got {list(self.choices)}")
        set_(self, "stop_token_ids", as_token_ids("stop_token_ids", self.stop_token_ids))
        if self.choice_scoring not in CHOICE_SCORINGS:
            raise InvalidRequestError(
                f"choice_scoring must be one of {', '.join(CHOICE_SCORINGS)}, "
                f"got {self.choice_scoring!r}"
            )
        flags = (
            "ignore_eos",
            "include_stop_str_in_output",
            "length_normalize",
            "token_healing",
            "pause_on_stop",
            "pause_at_end",
        )
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(
                    f"{name} must be True or False, got {getattr(self, name)!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _items(name: str, value: Any, what: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequestError(f"{name} must be a list of {what}, got {value!r}")
    return tuple(value)


def _strings(name: str, value: Any, one_allowed: bool) -> tuple[str, ...]:
    """A tuple of non-empty strings; `one_allowed`: a lone string stands for a list of one."""
    if isinstance(value, str):
        if not one_allowed:
            raise InvalidRequestError(f"{name} must be a list of strings, not one string")
        value = (value,)
    items = _items(name, value, "strings")
    for item in items:
        if not isinstance(item, str) or not item:
            raise InvalidRequestError(f"{name} must hold only non-empty strings, got {item!r}")
    return items
