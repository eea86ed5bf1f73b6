"""The integer and real-number checks every layer uses, so each field is checked one way.

Callers' numbers come from Python, numpy and parsed text alike: integers are anything with
`__index__` (numpy integers too), reals anything `numbers.Real` (numpy floats too), and
bools are refused for both (`True` is an int to Python, but never a count or a
temperature). Each check returns a plain `int` or `float`, so nothing downstream sees a
numpy scalar, and raises `error` (InvalidRequestError unless the caller's field is a
setting) with a message that names the field.

A message says what was wrong: the kind when the type is wrong ("must be an integer"), the
bound when the value is out of range ("must be >= 0"). When positivity is the only bound,
the kind says it in both cases ("must be a positive integer").
"""

from __future__ import annotations

import math
import operator
from numbers import Real

from covey.errors import CoveyError, InvalidRequestError


def as_int(
    field: str,
    value: object,
    *,
    ge: int | None = None,
    lt: int | None = None,
    note: str = "",
    error: type[CoveyError] = InvalidRequestError,
) -> int:
    """`value` as an int with `ge <= value < lt` (None: unbounded on that side).

    `note` follows the bound in a range error (e.g. " (0 disables it)").
    """
    if isinstance(value, bool):
        raise error(f"{field} must be {_int_kind(ge, lt)}, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise error(f"{field} must be {_int_kind(ge, lt)}, got {value!r}") from None
    if (ge is not None and number < ge) or (lt is not None and number >= lt):
        raise error(f"{field} must be {_int_bound(ge, lt)}{note}, got {number}")
    return number


def as_real(
    field: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    finite: bool = True,
    note: str = "",
    error: type[CoveyError] = InvalidRequestError,
) -> float:
    """`value` as a float within the bounds given (`ge <= value`, `gt < value`,
    `value <= le`; give at most one of ge and gt). `finite=False` lets inf through; NaN
    fails any bound. `note` follows the bound in a range error."""
    if isinstance(value, bool) or not isinstance(value, Real):
        kind = "a positive number" if _positive_only(ge, gt, le) else "a number"
        raise error(f"{field} must be {kind}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range: as far out as a float can say
        number = math.inf if value > 0 else -math.inf
    if finite and not math.isfinite(number):
        raise error(f"{field} must be a finite number, got {number}")
    # Written as `not (inside)` so that NaN, which compares False with everything, fails.
    if (
        (ge is not None and not number >= ge)
        or (gt is not None and not number > gt)
        or (le is not None and not number <= le)
    ):
        raise error(f"{field} must be {_real_bound(ge, gt, le)}{note}, got {number}")
    return number


def _int_kind(ge: int | None, lt: int | None) -> str:
    return "a positive integer" if ge == 1 and lt is None else "an integer"


def _int_bound(ge: int | None, lt: int | None) -> str:
    if ge is not None and lt is not None:
        return f"an integer in [{ge}, {lt})"
    if ge == 1:
        return "a positive integer"
    return f">= {ge}" if ge is not None else f"< {lt}"


def _positive_only(ge: float | None, gt: float | None, le: float | None) -> bool:
    return gt == 0 and ge is None and le is None


def _real_bound(ge: float | None, gt: float | None, le: float | None) -> str:
    if _positive_only(ge, gt, le):
        return "a positive number"
    low, sign, bracket = (ge, ">=", "[") if ge is not None else (gt, ">", "(")
    if low is not None and le is not None:
        return f"in {bracket}{low}, {le}]"
    return f"{sign} {low}" if low is not None else f"<= {le}"
