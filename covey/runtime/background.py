"""`BackgroundRuntime`: a Runtime on its own event-loop thread.

The engine's async front end belongs to one event loop, yet apps are called from plain
scripts, notebooks and other loops. Running the Runtime on a private loop lets all of
them share one engine: `run` blocks, `arun` and `stream` await from any loop. This is what
`app(...)`, `await app.acall(...)` and `app.stream(...)` use.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import CancelledError, Future
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

from covey.errors import RuntimeExecutionError
from covey.graph.app import App
from covey.graph.plan import Plan
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.llm_engine import LLMEngine
from covey.retrieval.searcher import Searcher
from covey.runtime.events import Event
from covey.runtime.executor import RunResult, Runtime

_END = object()
_CLOSED_MID_RUN = "the runtime was closed while this run was in flight"
# How long an interrupted `run` waits for the cancelled run to abort its engine requests.
CANCEL_WAIT_S = 10.0
log = logging.getLogger(__name__)


@dataclass
class _RunSlot:
    """Where a run submitted from another thread leaves its task, so it can be cancelled."""

    task: asyncio.Task[Any] | None = None


async def _tracked(start: Callable[[], Awaitable[Any]], slot: _RunSlot) -> Any:
    slot.task = asyncio.current_task()
    return await start()


async def _cancel(slot: _RunSlot, future: Future[Any]) -> None:
    """On the runtime's loop: cancel a submitted run and wait until its cleanup is done."""
    # Queued after the run's own first step, so its task is known by now.
    task = slot.task
    if task is None:
        future.cancel()
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _make_llm(model: str | None, engine: LLMEngine | None, config: dict) -> AsyncLLM:
    """Built on the loop thread, which runs the engine's steps on CPU: the thread that
    loads the weights is then the only one running parallel torch ops (see AsyncLLM)."""
    return AsyncLLM(model, engine=engine, **config)


class BackgroundRuntime:
    """`engine` reuses a built engine; otherwise `model` and `engine_config` make one."""

    def __init__(
        self,
        model: str | None = None,
        *,
        engine: LLMEngine | None = None,
        retrievers: dict[str, Searcher] | None = None,
        timeout_s: float | None = None,
        optimize: bool = True,
        **engine_config: Any,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="covey-runtime", daemon=True
        )
        self._thread.start()
        self._closed = self._closing = False
        try:
            self.llm: AsyncLLM = self._submit(_make_llm(model, engine, engine_config)).result()
        except BaseException:
            self._stop_loop()  # a model that fails to load leaves no thread behind
            raise
        self.runtime = Runtime(self.llm, retrievers, timeout_s, optimize)

    def bind_retriever(self, name: str, retriever: Searcher) -> None:
        self.runtime.bind_retriever(name, retriever)

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        if self._closed:
            coro.close()
            raise RuntimeExecutionError("this runtime is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, app: App | Plan, /, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Run `app` and block until its outputs are ready.

        Interrupted while waiting (Ctrl-C), it cancels the run, which aborts its engine
        requests and frees their KV, before the KeyboardInterrupt goes on up.
        """
        return self._blocking(partial(self.runtime.run, app, *args, **inputs))

    def run_traced(
        self, app: App | Plan, /, *args: Any, record_prompts: bool = False, **inputs: Any
    ) -> RunResult:
        """Like `run`, returning the outputs with the run's trace (see `Runtime.run_traced`)."""
        run = partial(self.runtime.run_traced, app, *args, record_prompts=record_prompts)
        return self._blocking(partial(run, **inputs))

    def _blocking(self, start: Callable[[], Awaitable[Any]]) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeExecutionError("run() would block the runtime's own loop; use arun()")
        slot = _RunSlot()
        future = self._submit(_tracked(start, slot))
        try:
            return future.result()
        except CancelledError:
            raise RuntimeExecutionError(_CLOSED_MID_RUN) from None
        except KeyboardInterrupt:
            self._cancel_run(slot, future)
            raise

    def _cancel_run(self, slot: _RunSlot, future: Future[Any]) -> None:
        """Cancel a run from the caller's thread and wait (bounded) until its cleanup, which
        aborts its engine requests, is done."""
        if self._closed:
            return
        done = asyncio.run_coroutine_threadsafe(_cancel(slot, future), self._loop)
        try:
            done.result(timeout=CANCEL_WAIT_S)
        except TimeoutError:
            log.warning("a cancelled run was still cleaning up after %ss", CANCEL_WAIT_S)

    async def arun(self, app: App | Plan, /, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Run `app` from any event loop."""
        future = self._submit(self.runtime.run(app, *args, **inputs))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if self._closing and future.cancelled():
                raise RuntimeExecutionError(_CLOSED_MID_RUN) from None
            raise

    async def stream(
        self, app: App | Plan, /, *args: Any, record_prompts: bool = False, **inputs: Any
    ) -> AsyncIterator[Event]:
        """Node events and token deltas, relayed to the caller's loop.

        Leaving early (`break`, `aclose()`, the caller's task cancelled, its loop shut down
        by `asyncio.run`) cancels the run and waits, without blocking the caller's loop,
        until its engine requests are aborted and their KV freed. A caller's loop closed
        without closing the stream is noticed at the run's next event, which then cancels
        the run: events are never sent to a closed loop.
        """
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> bool:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is left to read
                return False
            return True

        async def pump() -> None:
            events = self.runtime.stream(app, *args, record_prompts=record_prompts, **inputs)
            try:
                async with aclosing(events):
                    async for event in events:
                        if not put(event):
                            return  # closing `events` cancels the run
            except asyncio.CancelledError:
                if self._closing:
                    put(RuntimeExecutionError(_CLOSED_MID_RUN))
                raise
            except Exception as exc:
                put(exc)
            finally:
                put(_END)

        slot = _RunSlot()
        future = self._submit(_tracked(pump, slot))
        ended = False
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
            ended = True
        finally:
            if not ended and not future.done() and not self._closed:
                await self._stop(slot, future)

    async def _stop(self, slot: _RunSlot, future: Future[Any]) -> None:
        """Cancel a stream's run on the runtime's loop and wait for its cleanup from the
        caller's loop (bounded: a stuck cleanup is logged, never waited on forever)."""
        done = asyncio.run_coroutine_threadsafe(_cancel(slot, future), self._loop)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), CANCEL_WAIT_S)
        except TimeoutError:
            log.warning("a cancelled stream was still cleaning up after %ss", CANCEL_WAIT_S)
        except asyncio.CancelledError:
            # The caller is shutting down (asyncio.run cancels the task closing this stream):
            # the cleanup takes milliseconds, so wait for it here rather than leave it behind.
            try:
                done.result(timeout=CANCEL_WAIT_S)
            except Exception:
                log.warning("a cancelled stream was still cleaning up after %ss", CANCEL_WAIT_S)
            raise

    def close(self) -> None:
        """Cancel runs in flight (their callers get an error), stop the engine and the loop
        thread; later calls raise."""
        if self._closed:
            return
        self._closing = True
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._closed = True
        self._stop_loop()

    async def _shutdown(self) -> None:
        me = asyncio.current_task()
        runs = [t for t in asyncio.all_tasks() if t is not me]
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await self.llm.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BackgroundRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: BackgroundRuntime | None = None
_default_lock = threading.Lock()


def default_runtime() -> BackgroundRuntime:
    """The process-wide runtime behind `app(...)`; built on first use with the embedded
    model. Bind retrievers with `default_runtime().bind_retriever(name, index)`."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = BackgroundRuntime()
            atexit.register(_default.close)  # stop the engine before the loop thread dies
        return _default


def set_default_runtime(runtime: BackgroundRuntime | None) -> BackgroundRuntime | None:
    """Use `runtime` for `app(...)` calls (None: build the default on next use); returns
    the previous one, which stays open."""
    global _default
    with _default_lock:
        previous, _default = _default, runtime
        return previous
