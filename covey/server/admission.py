"""`Admission`: a bound on the requests the server runs at once.

Past the bound a caller is better served by a fast 429 with Retry-After than by a queue
that grows without limit, stretching every request's latency and holding memory. Each
generating request holds slots while it runs (a batch holds one per input); the check
and the take happen in one event-loop step, so two requests never both take the last slot.
A request asking for more slots than the bound is refused by the routes before it gets
here (422: no retry could admit it; `ServerSettings.max_fan_out`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from covey.errors import ConfigError, EngineOverloadedError


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    def acquire(self, n: int = 1) -> Release:
        """Take `n` slots now or raise `EngineOverloadedError`; the returned `Release` gives
        them back (once, however often it is called)."""
        if self.in_flight + n > self.max_in_flight:
            raise EngineOverloadedError(
                f"the server is at its limit of {self.max_in_flight} requests in flight "
                f"({self.in_flight} running, {n} asked); retry shortly"
            )
        self.in_flight += n
        return Release(self, n)

    @contextmanager
    def slots(self, n: int = 1) -> Iterator[None]:
        """Hold `n` slots for a block."""
        release = self.acquire(n)
        try:
            yield
        finally:
            release()


class Release:
    """Gives a request's slots back exactly once (a stream may end in several ways)."""

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission, self._n = admission, n

    def __call__(self) -> None:
        if self._n:
            self._admission.in_flight -= self._n
            self._n = 0
