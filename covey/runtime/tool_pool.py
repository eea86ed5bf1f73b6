"""`ToolPool`: where tools run, apart from `@function` nodes, each under a timeout.

Why a pool of its own: tools are slow and may hang (a stuck HTTP call, a human). If they
shared asyncio's default thread pool with `@function` nodes, a handful of hung calls would
starve every app on the runtime, and since that pool's threads are joined at exit, the
interpreter could never exit. So:

- sync tools with `executor="thread"` run on this pool's own daemon threads (`threads` of
  them). A call past its timeout fails at once with `ToolTimeoutError`; its thread cannot
  be killed, so it is written off and a fresh thread takes its place (at most `max_hung`
  written-off threads at a time; past that, calls fail fast rather than queue behind them).
  A written-off thread exits when its call returns. Daemon threads never block exit.
- `executor="process"` tools (CPU-bound, or not trusted to return) run in worker
  processes (`processes` of them, spawned on first use). A call past its timeout kills its
  process; a new one is spawned for the next call.
- async tools run on the event loop and are cancelled at their timeout.

Every result is checked against the tool's return annotation (`ToolSpec.check_return`).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from covey.checks import as_int, as_real
from covey.errors import ConfigError, ErrorCategory, RuntimeExecutionError
from covey.graph.tools import DEFAULT_TOOL_TIMEOUT_S, ToolSpec
from covey.tool_worker import serve


class ToolError(RuntimeExecutionError):
    """A tool call that did not return a usable value."""

    category = ErrorCategory.INTERNAL


class ToolTimeoutError(ToolError, TimeoutError):
    """A tool ran past its timeout."""

    category = ErrorCategory.UNAVAILABLE


class ToolFailedError(ToolError):
    """A tool raised (or its process died); the message names the tool and the cause."""


class ToolPoolExhaustedError(ToolError):
    """Too many of this pool's threads are stuck in hung tool calls to take another."""

    category = ErrorCategory.OVERLOADED


STARTUP_TIMEOUT_S = 120.0


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    started: bool = False
    abandoned: bool = False


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


@dataclass
class _Threads:
    """Daemon worker threads over one job queue; hung workers are replaced, not waited on."""

    size: int
    max_hung: int
    jobs: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: int = 0
    hung: int = 0

    def submit(self, job: _Job) -> None:
        with self.lock:
            if self.hung >= self.max_hung:
                raise ToolPoolExhaustedError(
                    f"{self.hung} tool calls are hung past their timeouts on this pool's "
                    "threads; fix or shorten those tools (or raise ToolPool(max_hung=...))"
                )
            while self.live < self.size:
                self._spawn()
        self.jobs.put(job)

    def _spawn(self) -> None:
        self.live += 1
        threading.Thread(target=self._work, name="covey-tool", daemon=True).start()

    def abandon(self, job: _Job) -> None:
        """The caller gave up on `job` (timeout or cancel): if a thread is stuck in it,
        write that thread off and start another in its place."""
        with self.lock:
            job.abandoned = True
            if job.started:
                self.hung += 1
                self.live -= 1
                self._spawn()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self.lock:
                if job.abandoned:
                    continue
                job.started = True
            try:
                ok, value = True, job.fn(**job.kwargs)
            except BaseException as e:  # the tool's own failure, handed to its caller
                ok, value = False, e
            with self.lock:
                if job.abandoned:  # written off: a replacement already runs, so leave
                    self.hung -= 1
                    return
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, ok, value)
            except RuntimeError:  # the caller's loop is closed
                pass

    def close(self) -> None:
        with self.lock:
            for _ in range(self.live):
                self.jobs.put(None)
            self.live = 0


class _Process:
    """One spawned worker process and its end of the pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child,), daemon=True, name="covey-tool")
        self.proc.start()
        child.close()
        self.dead = False
        if not self.conn.poll(STARTUP_TIMEOUT_S):  # blocking: called in a worker thread
            self.kill()
            raise ToolError(f"a tool worker process did not start in {STARTUP_TIMEOUT_S:g}s")
        self.conn.recv()

    async def call(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            self.conn.send(((fn.__module__, fn.__qualname__), kwargs))
            await ready
            return self.conn.recv()
        except (EOFError, OSError):
            self.dead = True
            self.proc.join(timeout=5)
            return "error", f"its worker process died (exit code {self.proc.exitcode})"
        finally:
            loop.remove_reader(fd)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class ToolPool:
    """Runs tool calls: `await pool.call(spec, kwargs)` returns the checked result or raises
    a `ToolError` (`ToolTimeoutError`, `ToolFailedError`) or `ToolReturnError`."""

    def __init__(
        self,
        threads: int = 4,
        processes: int = 1,
        default_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
        max_hung: int = 16,
    ) -> None:
        self.default_timeout_s = as_real(
            "ToolPool default_timeout_s", default_timeout_s, gt=0, error=ConfigError
        )
        self._threads = _Threads(
            as_int("ToolPool threads", threads, ge=1, error=ConfigError),
            as_int("ToolPool max_hung", max_hung, ge=0, error=ConfigError),
        )
        self._num_processes = as_int("ToolPool processes", processes, ge=1, error=ConfigError)
        self._idle: list[_Process] = []
        self._process_slots: asyncio.Semaphore | None = None
        self._closed = False

    def timeout_of(self, spec: ToolSpec) -> float:
        return spec.timeout_s if spec.timeout_s is not None else self.default_timeout_s

    @property
    def hung_threads(self) -> int:
        """Threads written off to hung calls that have not returned yet."""
        return self._threads.hung

    async def call(self, spec: ToolSpec, kwargs: dict[str, Any]) -> Any:
        if self._closed:
            raise ToolError("this ToolPool is closed")
        timeout = self.timeout_of(spec)
        if spec.is_async:
            run = self._run_async(spec, kwargs, timeout)
        elif spec.executor == "process":
            run = self._run_process(spec, kwargs, timeout)
        else:
            run = self._run_thread(spec, kwargs, timeout)
        return spec.check_return(await run)

    def _timed_out(self, spec: ToolSpec, timeout: float) -> ToolTimeoutError:
        return ToolTimeoutError(f"tool {spec.name!r} timed out after {timeout:g}s")

    def _failed(self, spec: ToolSpec, cause: str) -> ToolFailedError:
        return ToolFailedError(f"tool {spec.name!r} failed: {cause}")

    async def _run_async(self, spec: ToolSpec, kwargs: dict[str, Any], timeout: float) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await spec.fn(**kwargs)
        except TimeoutError:
            raise self._timed_out(spec, timeout) from None
        except ToolError:
            raise
        except Exception as e:
            raise self._failed(spec, f"{type(e).__name__}: {e}") from e

    async def _run_thread(self, spec: ToolSpec, kwargs: dict[str, Any], timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(spec.fn, kwargs, loop, loop.create_future())
        self._threads.submit(job)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(job.future)
        except TimeoutError:
            self._threads.abandon(job)
            raise self._timed_out(spec, timeout) from None
        except asyncio.CancelledError:
            self._threads.abandon(job)
            raise
        except Exception as e:
            raise self._failed(spec, f"{type(e).__name__}: {e}") from e

    async def _run_process(self, spec: ToolSpec, kwargs: dict[str, Any], timeout: float) -> Any:
        if self._process_slots is None:
            self._process_slots = asyncio.Semaphore(self._num_processes)
        async with self._process_slots:
            worker = self._idle.pop() if self._idle else await asyncio.to_thread(_Process)
            keep = False
            try:
                async with asyncio.timeout(timeout):
                    status, value = await worker.call(spec.fn, kwargs)
                keep = not worker.dead and worker.proc.is_alive()
            except TimeoutError:
                raise self._timed_out(spec, timeout) from None
            except Exception as e:  # e.g. the function or an argument cannot be pickled
                status, value = "error", f"{type(e).__name__}: {e}"
                keep = False
            finally:
                if keep and not self._closed:
                    self._idle.append(worker)
                else:
                    worker.kill()
        if status != "ok":
            raise self._failed(spec, value)
        return value

    def close(self) -> None:
        """Stop idle workers; threads stuck in hung calls are daemons and die with the
        process."""
        self._closed = True
        self._threads.close()
        while self._idle:
            self._idle.pop().kill()
