"""Token ids given by callers (token-id prompts, segments, stop tokens): one check for all.

Ids are checked twice: for type and sign where they are given (a dataclass or a prompt),
and against the model's vocabulary when the engine takes the request, since an id past the
embedding table fails only inside a batched forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

from covey.checks import as_int
from covey.errors import InvalidRequestError


def as_token_ids(field: str, value: object) -> tuple[int, ...]:
    """`value` as a tuple of ints >= 0 (numpy integers too, never bools or floats)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidRequestError(f"{field} must be a list of token ids (ints), got {value!r}")
    each = f"{field}: each token id"  # formatted once: prompts hold thousands of ids
    return tuple([as_int(each, t, ge=0) for t in value])


def check_in_vocab(field: str, ids: Iterable[int], vocab_size: int) -> None:
    """Raise unless every id indexes the model's embedding table."""
    for t in ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{field}: token ids must be in [0, {vocab_size}), got {t}")
