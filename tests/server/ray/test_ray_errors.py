"""Errors a replica raises reach the front as covey's own classes and messages, streamed or
not, never as Ray's wrapper (its text carries ANSI codes and the replica's traceback). No
cluster: the handle here is a plain object whose calls raise what Ray raises."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError

from covey.errors import InvalidRequestError
from covey.server import ray_engine
from covey.server.errors import http_error
from covey.server.ray_engine import RayEngine
from covey.server.replica_router import ReplicaRouter


def ray_wrapped(cause: Exception) -> Exception:
    """What Ray raises in the caller for `cause` raised in a replica's streamed method."""
    traceback = 'Traceback (most recent call last):\n  File "/srv/replica.py", line 1\n'
    wrapper = RayTaskError("generate", traceback, cause, proctitle="ray::Replica")
    return wrapper.as_instanceof_cause()


class RaisingStream:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.was_cancelled = False

    def __aiter__(self) -> RaisingStream:
        return self

    async def __anext__(self):
        raise self.exc

    def cancel(self) -> None:
        self.was_cancelled = True

    def cancelled(self) -> bool:
        return self.was_cancelled


class Method:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def options(self, **_: object) -> Method:
        return self

    def remote(self, *_: object) -> RaisingStream:
        return RaisingStream(self.exc)


class RaisingHandle:
    """A replica handle whose `generate` stream raises `exc` at its first item."""

    def __init__(self, exc: Exception) -> None:
        self.generate = Method(exc)


def test_the_wrapper_is_also_the_covey_class():
    # Why the unwrapping must come first: an `except CoveyError` would catch the wrapper.
    wrapped = ray_wrapped(InvalidRequestError("bad prompt"))
    assert isinstance(wrapped, InvalidRequestError) and type(wrapped) is not InvalidRequestError


def test_a_streamed_replica_error_arrives_as_the_covey_error_it_was():
    engine = RayEngine({"r0": RaisingHandle(ray_wrapped(InvalidRequestError("bad prompt")))})

    async def run() -> None:
        async for _ in engine.generate("hello", request_id="x"):
            pass

    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(run())
    assert type(err.value) is InvalidRequestError
    assert str(err.value) == "bad prompt"
    assert http_error(err.value).status == 400
    assert engine.router.views["r0"].in_flight == 0 and not engine._running


def test_a_synchronous_failure_to_send_leaks_no_load():
    class Unsendable:
        class generate:  # noqa: N801 - mirrors a handle's method attribute
            @staticmethod
            def options(**_: object):
                raise TypeError("cannot serialize the prompt")

    engine = RayEngine({"r0": Unsendable()}, ReplicaRouter(["r0"]))

    async def run() -> None:
        async for _ in engine.generate("hello", request_id="x"):
            pass

    with pytest.raises(TypeError):
        asyncio.run(run())
    assert engine.router.views["r0"].in_flight == 0
    assert "x" not in engine._running


class HangingReport:
    """A report call that never answers, and whose cancel raises, as Ray's can when the
    assignment failed at the timeout."""

    def __await__(self):
        return asyncio.get_running_loop().create_future().__await__()

    def cancel(self) -> None:
        raise RuntimeError("the assignment failed")


class SlowReportHandle:
    def __init__(self) -> None:
        self.report = self
        self.calls = 0

    def remote(self) -> HangingReport:
        self.calls += 1
        return HangingReport()


def test_a_report_given_up_whose_cancel_raises_is_only_skipped(monkeypatch):
    """Cancelling a timed-out report is best effort: its failure must not fail the reports
    loop or a caller of `stats(refresh=True)`."""
    monkeypatch.setattr(ray_engine, "REPORT_TIMEOUT_S", 0.05)
    handle = SlowReportHandle()
    engine = RayEngine({"r0": handle})
    assert asyncio.run(engine._report(engine.replicas["r0"])) is None
    assert handle.calls == 1 and engine.replicas["r0"].up
