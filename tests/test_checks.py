"""as_int and as_real: the one integer check and the one real-number check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covey.checks import as_int, as_real
from covey.errors import ConfigError, InvalidRequestError


def test_integers_of_any_integral_type_come_back_as_int():
    for value in (3, np.int64(3), np.int32(3), np.uint8(3)):
        number = as_int("n", value, ge=0)
        assert number == 3 and type(number) is int
    assert as_int("n", -(2**70)) == -(2**70)  # no bounds: any int


@pytest.mark.parametrize(
    ("value", "kw", "message"),
    [
        (True, {}, "n must be an integer, got True"),
        (2.0, {}, "n must be an integer, got 2.0"),
        ("3", {"ge": 0}, "n must be an integer, got '3'"),
        (None, {"ge": 0, "lt": 4}, "n must be an integer, got None"),
        (np.float64(1.0), {}, r"n must be an integer, got \S*1.0"),
        # positivity as the only bound is the kind itself, in both messages
        (False, {"ge": 1}, "n must be a positive integer, got False"),
        (1.5, {"ge": 1}, "n must be a positive integer, got 1.5"),
        (0, {"ge": 1}, "n must be a positive integer, got 0"),
        (np.int64(-2), {"ge": 1}, "n must be a positive integer, got -2$"),
        (-1, {"ge": 0}, "n must be >= 0, got -1"),
        (-1, {"ge": 0, "note": " (0 disables it)"}, r"n must be >= 0 \(0 disables it\), got -1"),
        (4, {"ge": 0, "lt": 4}, r"n must be an integer in \[0, 4\), got 4"),
        (-1, {"ge": 0, "lt": 4}, r"n must be an integer in \[0, 4\), got -1"),
        (9, {"lt": 9}, "n must be < 9, got 9"),
    ],
)
def test_bad_integers_are_refused_by_name(value, kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        as_int("n", value, **kw)


def test_bounds_are_inclusive_below_and_exclusive_above():
    assert as_int("n", 0, ge=0, lt=4) == 0
    assert as_int("n", 3, ge=0, lt=4) == 3
    assert as_int("n", 1, ge=1) == 1


def test_the_error_class_is_the_callers():
    with pytest.raises(ConfigError, match="EngineConfig.block_size must be a positive integer"):
        as_int("EngineConfig.block_size", 0, ge=1, error=ConfigError)
    with pytest.raises(ConfigError, match="timeout_s must be a positive number, got 'x'"):
        as_real("timeout_s", "x", gt=0, error=ConfigError)


def test_reals_of_any_real_type_come_back_as_float():
    for value in (2, 2.0, np.float32(2.0), np.int64(2)):
        number = as_real("x", value, ge=0)
        assert number == 2.0 and type(number) is float
    assert as_real("x", math.inf, gt=0, finite=False) == math.inf


@pytest.mark.parametrize(
    ("value", "kw", "message"),
    [
        (False, {}, "x must be a number, got False"),
        ("0.5", {"ge": 0}, "x must be a number, got '0.5'"),
        (None, {"gt": 0, "le": 1}, "x must be a number, got None"),
        (1j, {}, r"x must be a number, got 1j"),
        (math.nan, {}, "x must be a finite number, got nan"),
        (-math.inf, {"ge": 0}, "x must be a finite number, got -inf"),
        (-1, {"ge": 0}, "x must be >= 0, got -1.0"),
        (0.0, {"gt": 0, "le": 1}, r"x must be in \(0, 1\], got 0.0"),
        (1.5, {"gt": 0, "le": 1}, r"x must be in \(0, 1\], got 1.5"),
        (1.5, {"ge": 0, "le": 1}, r"x must be in \[0, 1\], got 1.5"),
        (2, {"le": 1}, "x must be <= 1, got 2.0"),
        (1, {"gt": 1}, "x must be > 1, got 1.0"),
        # positivity as the only bound is the kind itself, in both messages
        ("10", {"gt": 0}, "x must be a positive number, got '10'"),
        (0, {"gt": 0, "note": " of seconds"}, "x must be a positive number of seconds, got 0.0"),
        # NaN fails any bound even where non-finite values are allowed
        (math.nan, {"gt": 0, "finite": False}, "x must be a positive number, got nan"),
    ],
)
def test_bad_reals_are_refused_by_name(value, kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        as_real("x", value, **kw)


def test_real_bounds_are_the_ones_asked_for():
    assert as_real("x", 0, ge=0) == 0.0
    assert as_real("x", 1, gt=0, le=1) == 1.0
    assert math.isnan(as_real("x", math.nan, finite=False))  # no bound: NaN passes


def test_an_int_past_floats_range_is_refused_or_infinite_not_an_overflow():
    with pytest.raises(InvalidRequestError, match="temperature must be a finite number"):
        as_real("temperature", 10**400, ge=0)
    with pytest.raises(InvalidRequestError, match="x must be >= 0"):
        as_real("x", -(10**400), ge=0, finite=False)
    assert as_real("timeout_s", 10**400, gt=0, finite=False) == math.inf
