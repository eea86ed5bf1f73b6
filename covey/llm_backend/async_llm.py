"""`AsyncLLM`: streaming, one request at a time from many coroutines, batched underneath.

The engine is single-threaded by design. On CUDA its calls run on one worker thread, so
the event loop stays free while kernels run. On CPU they run on the event loop's own
thread, between other coroutines: PyTorch's OpenMP pool belongs to a thread, and a second
thread running parallel ops (a worker next to the thread that loaded the model) makes
libgomp stop spinning when threads outnumber cores: 1.45x slower TPOT on 2 cores
(`benchmarks/async_engine.py`). A caller whose loop must answer while a long step runs
(a Ray Serve replica: Serve's health checks run on it) asks for the worker thread on CPU
too; the engine is then built on that thread, so it is the only one with a pool (on CUDA,
by default, the engine is built on the caller's thread and only stepped on the worker: a
GPU has no per-thread pool). A stream whose consumer goes away (cancelled, closed) aborts
its request and frees its KV at once.

A step that never returns (a deadlock, a hung disk read) leaves a free loop and requests
that wait forever; so this records when the engine call now running started
(`engine_call_s`), and whether the step loop died of an error (`step_loop_error`), for a
caller's health check to judge.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from covey.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    NotSupportedError,
)
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.engine_client import CacheReport, EngineCapabilities, EngineStats
from covey.llm_backend.llm_engine import LLMEngine, Prompt
from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.request_validator import check_request_id
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from covey.llm_backend.sequence import FinishReason

log = logging.getLogger(__name__)

# Event-loop turns the step loop leaves to other coroutines between two steps. On CPU a
# step blocks the loop, and work that arrived during it needs a few turns, one hop each: a
# new request to reach the engine (a server's hand-off to this loop, the call's coroutine,
# `_stream`'s add task), an output to leave (its stream, then the server's sender). Every
# turn the step loop takes first costs that work a whole step. With one turn, Ray Serve
# replicas (benchmarks/scale.py) lost a step getting each request in and another getting
# its first token out: 0.1 s at a decode step, seconds behind a long prefill. An idle
# turn costs microseconds.
TURNS_BETWEEN_STEPS = 8


class AsyncLLM:
    """The in-process `EngineClient`: covey's own engine, every capability offered."""

    def __init__(
        self,
        model: str | None = None,
        *,
        engine: LLMEngine | None = None,
        worker_thread: bool | None = None,
        **config: Any,
    ) -> None:
        """`worker_thread`: step the engine on its own thread (default: on CUDA only). Asked
        for with an engine still to build (`engine=None`), it is built on that thread too:
        torch's CPU thread pool belongs to the thread that runs the ops, so the one that
        loads the model is the one that steps it, and no second pool competes for cores.
        Every call on that thread runs in the context of the thread that built this object,
        since torch keeps its config overrides (inductor's compiler, dynamo's flags) in
        context variables, which a new thread would otherwise start without."""
        self._owns_engine = engine is None  # then closing this closes the engine's store
        self._executor: ThreadPoolExecutor | None = None
        self._context = contextvars.copy_context()
        if worker_thread and engine is None:
            self._executor = _engine_thread()
            build = partial(LLMEngine, EngineConfig(model=model, **config))
            try:
                engine = self._executor.submit(self._context.run, build).result()
            except BaseException:
                self._executor.shutdown(wait=False)
                raise
        self.engine = engine or LLMEngine(EngineConfig(model=model, **config))
        if worker_thread is None:
            worker_thread = self.engine.device.type == "cuda"
        if worker_thread and self._executor is None:
            self._executor = _engine_thread()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the step loop runs on
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._executor_gone = False  # shut down by close(): no call can run any more
        self._call_started: float | None = None  # monotonic start of the running engine call

    @property
    def closed(self) -> bool:
        """True once `close()` began: no new request is taken."""
        return self._closed

    def engine_call_s(self) -> float:
        """Seconds the engine call now running (a step, a report's cache read) has run; 0.0
        when none runs. Read from any thread: a step that never returns shows here as a
        number that only grows, while the loop itself stays free."""
        started = self._call_started
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def step_loop_error(self) -> BaseException | None:
        """The error the step loop died of, if it did (not cancelled): requests then wait
        forever, nothing steps them. A step's own failure does not count; the loop fails
        the requests it held and goes on."""
        task = self._loop_task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(
            prefill=True,
            pause=True,
            choices=True,
            segments=True,
            chunks=self.engine.chunk_store is not None,
            computes_on_loop_thread=self._executor is None,
        )

    async def stats(self) -> EngineStats:
        return await self._call(self.engine.stats)

    async def pause(self, request_id: str, tool: str | None = None) -> None:
        """Hold a request aside while a tool runs (or name the `tool` a request paused by
        its own turn waits for); its stream waits, the pause policy keeps, swaps or drops
        its KV."""
        await self._call(self.engine.pause_request, request_id, tool)

    async def resume(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Append `extra` (a tool's result) to a paused request; its stream goes on."""
        await self._call(self.engine.resume_request, request_id, extra, params)
        self._ensure_loop()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Abort what is running, stop the step loop and the worker thread."""
        self._closed = True
        for rid in list(self._streams):
            await self.abort(rid)
        task = self._loop_task
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._owns_engine:
            self._owns_engine = False
            await self._call(self.engine.close)
        if self._executor is not None:
            # Not waiting: the engine's close ran above, after every job queued before it,
            # and a wait here would block this loop behind any job queued since.
            self._executor.shutdown(wait=False)
            self._executor_gone = True

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, one per step with new tokens, the last one finished.

        Bad requests raise InvalidRequestError before the first output. A request that
        fails inside the engine raises EngineError from its stream; the others go on.
        """
        add = partial(self.engine.add_request, prompt, params, priority=priority)
        async for out in self._stream(add, request_id):
            yield out

    async def prefill(
        self,
        prompt: Prompt,
        priority: int = 0,
        pin: str | None = None,
        request_id: str | None = None,
    ) -> RequestOutput | None:
        """Compute a prompt's KV into the prefix cache now, generating nothing (early
        prefill); `pin` keeps it cached until `unpin(pin)`. None when nothing was computed."""
        add = partial(self.engine.add_prefill, prompt, priority=priority, pin=pin)
        final = None
        async for out in self._stream(add, request_id, maybe_none=True):
            final = out
        return final

    async def unpin(self, pin: str) -> bool:
        return await self._call(self.engine.unpin, pin)

    async def pinned(self) -> dict[str, int]:
        """Pin key -> tokens it holds in the prefix cache."""
        return await self._call(lambda: self.engine.pinned)

    async def cache_report(
        self, prompts: list[list[int]], chunks: list[list[int]]
    ) -> CacheReport:
        """What the caches hold of these token-id prompts and chunks (`CacheReporter`),
        read on the engine's thread: it must not race a step changing the caches."""
        return await self._call(self.engine.cache_report, prompts, chunks)

    async def _stream(
        self, add: Any, request_id: str | None, maybe_none: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Add a request with `add(request_id=...)` and yield its outputs until it finishes;
        a consumer that stops early aborts it. `maybe_none`: `add` may return None (no
        request was needed), which ends the stream at once."""
        if self._closed:
            raise EngineError("this AsyncLLM is closed")
        rid = check_request_id(request_id, self._streams)  # the engine checks its own too
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = queue
        added = finished = False
        adding = asyncio.ensure_future(self._call(partial(add, request_id=rid)))
        try:
            if await asyncio.shield(adding) is None and maybe_none:
                return
            added = True
            self._ensure_loop()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not added and not adding.done():
                # Cancelled while a worker thread was adding it: let that finish, then abort.
                await asyncio.gather(adding, return_exceptions=True)
                added = (
                    not adding.cancelled()
                    and adding.exception() is None
                    and adding.result() is not None
                )
            if added and not finished and not self._closed:
                await asyncio.shield(self._call(self.engine.abort_request, rid))

    async def generate_full(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> RequestOutput:
        """Await a request's final output (no streaming)."""
        outputs = [out async for out in self.generate(prompt, params, request_id, priority)]
        return outputs[-1]

    def chat(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the answer to chat messages, rendered with the model's chat template."""
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so no chat template")
        prompt = self.engine.tokenizer.apply_chat_template(messages)
        return self.generate(prompt, params, request_id)

    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        """Make the chunk store hold these chunks' KV: loaded from disk where it is there;
        with `compute`, the missing ones are computed standalone (batched together).

        Computing is opt-in: standalone KV is never an exact hit (it was not computed after
        the prompt's own prefix), and blended from it answers worse than KV taken from the
        prefill of the request that first read the chunk (planted facts, 40 questions:
        0.35 against 0.70 at ratio 0.15). Returns how many were loaded or computed."""
        if self.engine.chunk_store is None:
            raise NotSupportedError("warm_chunks needs chunk_cache 'exact' or 'blend', not 'off'")
        if not isinstance(chunks, list):
            raise InvalidRequestError(f"warm_chunks takes a list of Segments, got {chunks!r}")
        if not compute and not self.engine.can_load_chunks():
            return 0  # nothing below the host tier to load from: no work on the engine thread
        count, todo, seen = 0, [], set()
        for chunk in chunks:
            state = await self._call(self.engine.load_chunk, chunk)
            key = (chunk.text, chunk.token_ids)
            if state == "loaded":
                count += 1
            elif state == "missing" and key not in seen and compute:
                seen.add(key)
                todo.append(chunk)

        async def compute(chunk: Segment) -> int:
            add = partial(self.engine.add_warm_chunk, chunk)
            final = None
            async for out in self._stream(add, None, maybe_none=True):
                final = out
            return int(final is not None)

        return count + sum(await asyncio.gather(*(compute(c) for c in todo)))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with a finished output whose reason is "abort"."""
        out = await self._call(self.engine.abort_request, request_id)
        queue = self._streams.get(request_id)
        if queue is not None and out is not None:
            queue.put_nowait(out)

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            return self._timed(fn, *args)
        if self._executor_gone:
            raise EngineUnavailableError("the engine is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._context.run, self._timed, fn, *args
        )

    def _timed(self, fn: Any, *args: Any) -> Any:
        """Run one engine call, its start recorded for `engine_call_s` (one runs at a time:
        on the single worker thread, or on the loop's)."""
        self._call_started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._call_started = None

    def _ensure_loop(self) -> None:
        """Wake the step loop, starting it on the running event loop if needed.

        An AsyncLLM may outlive its event loop (one `asyncio.run` after another): the
        step-loop task and its wake event belong to the loop that made them, so on a new
        loop both are made afresh, and the old task, if its loop can still run it, is
        cancelled.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            old = self._loop_task
            if old is not None and not old.done() and not old.get_loop().is_closed():
                old.cancel()
            self._loop, self._wake, self._loop_task = loop, asyncio.Event(), None
        assert self._wake is not None
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._step_loop())

    async def _step_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while await self._call(self.engine.has_unfinished_requests):
                try:
                    outputs = await self._call(self.engine.step)
                except Exception as exc:
                    # The engine fails a request alone when the failure is its own; this
                    # is the last resort for one it could not pin on any request.
                    log.exception("engine step failed; failing the requests it held")
                    await self._fail_all(exc)
                    continue
                for out in outputs:
                    queue = self._streams.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(_as_stream_item(out))
                for _ in range(TURNS_BETWEEN_STEPS):  # consumers and new requests go first
                    await asyncio.sleep(0)

    async def _fail_all(self, exc: Exception) -> None:
        for rid in list(self.engine.requests):
            await self._call(self.engine.abort_request, rid)
            queue = self._streams.get(rid)
            if queue is not None:
                queue.put_nowait(EngineError(f"the engine failed while serving {rid}: {exc}"))


def _engine_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="covey-engine")


def _as_stream_item(out: RequestOutput) -> RequestOutput | EngineError:
    """What a stream sees: its output, or an EngineError if its request failed alone."""
    if out.finish_reason == FinishReason.ERROR:
        return EngineError(f"the engine failed while serving {out.request_id}: {out.error}")
    return out
