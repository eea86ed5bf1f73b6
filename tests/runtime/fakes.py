"""A stand-in `EngineClient` that records what happened when, for runtime tests.

It implements the whole protocol: what it declares in `capabilities` it does (in its own
simple terms: a reply per prompt, pins kept in a dict, a pause that holds a stream), and
what it does not declare raises `NotSupportedError`, as an engine must.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from covey.errors import EngineUnavailableError, InvalidRequestError, NotSupportedError
from covey.llm_backend.engine_client import EngineCapabilities, EngineStats, Prompt
from covey.llm_backend.outputs import RequestMetrics, RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment

BLOCK_SIZE = 16
DEFAULT_CAPABILITIES = EngineCapabilities(choices=True, segments=True, computes_on_loop_thread=True)


class FakeTokenizer:
    """Renders chat messages as `<role>content</role>`, enough to see what was sent; encodes
    text as its UTF-8 bytes."""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def _count_tokens(prompt: Prompt, tokenizer: FakeTokenizer) -> int:
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt))
    return sum(
        1 if isinstance(p, int) else len(p.token_ids or tokenizer.encode(p.text or ""))
        for p in prompt
    )


def _metrics(n_prompt: int, n_out: int, cached: int) -> RequestMetrics:
    return RequestMetrics(None, None, None, None, n_prompt, n_out, cached, 0)


@dataclass
class _Stream:
    """One request in flight: `running` is cleared while it is paused."""

    prompt: Any
    params: SamplingParams
    running: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False


@dataclass
class FakeLLM:
    """Each request emits `reply(prompt)` split on spaces, one word per `token_delay` seconds.

    `log` records ("submit" | "finish", request_id, time); `prompts` and `priorities` what
    each request carried; `cached_tokens` is reported as the prefix-cache hit of each one;
    `aborted` lists requests that ended before their last word (aborted or cancelled).
    With `choices` in the params, the reply is the first choice it starts with (else the
    first choice). `prefills` records (prompt, pin) of each early prefill, `resumed` each resume,
    `warmed` the chunks of each `warm_chunks` call.
    """

    reply: Callable[[Any], str] = lambda prompt: "alpha beta"
    token_delay: float = 0.01
    cached_tokens: int = 3
    capabilities: EngineCapabilities = DEFAULT_CAPABILITIES
    model_name: str = "fake"
    tokenizer: FakeTokenizer | None = field(default_factory=FakeTokenizer)
    log: list[tuple[str, str, float]] = field(default_factory=list)
    prompts: dict[str, Any] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)
    params: dict[str, SamplingParams] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    prefills: list[tuple[Any, str | None]] = field(default_factory=list)
    pins: dict[str, int] = field(default_factory=dict)
    resumed: list[tuple[str, Prompt, SamplingParams | None]] = field(default_factory=list)
    warmed: list[list[Segment]] = field(default_factory=list)
    closed: bool = False
    _streams: dict[str, _Stream] = field(default_factory=dict)
    _count: int = 0

    def _new_id(self, request_id: str | None) -> str:
        if self.closed:
            raise EngineUnavailableError("this FakeLLM is closed")
        self._count += 1
        rid = request_id or f"fake-{self._count}"
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        return rid

    def _words(self, prompt: Any, params: SamplingParams) -> list[str]:
        text = self.reply(prompt)
        if params.choices:
            text = next((c for c in params.choices if text.startswith(c)), params.choices[0])
        return text.split(" ")[: params.max_tokens]

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        if params.choices and not self.capabilities.choices:
            raise NotSupportedError("this FakeLLM does not constrain outputs to choices")
        self._check_prompt(prompt)
        rid = self._new_id(request_id)
        stream = self._streams[rid] = _Stream(prompt, params)
        stream.running.set()
        self.log.append(("submit", rid, time.perf_counter()))
        self.prompts[rid], self.priorities[rid], self.params[rid] = prompt, priority, params
        words = self._words(prompt, params)
        text, ids = "", []
        finished = False
        try:
            for i, word in enumerate(words):
                await asyncio.sleep(self.token_delay)
                await stream.running.wait()
                if stream.aborted:
                    yield self._output(rid, text, ids, "", True, "abort")
                    return
                delta = word if i == 0 else " " + word
                text += delta
                ids.append(i)
                finished = i == len(words) - 1
                reason = "length" if finished else None
                yield self._output(rid, text, ids, delta, finished, reason)
        finally:
            del self._streams[rid]
            if not finished:
                self.aborted.append(rid)
            self.log.append(("finish", rid, time.perf_counter()))

    def _output(
        self, rid: str, text: str, ids: list[int], delta: str, finished: bool, reason: str | None
    ) -> RequestOutput:
        delta_ids = [ids[-1]] if delta else []
        metrics = _metrics(5, len(ids), self.cached_tokens)
        return RequestOutput(rid, text, list(ids), delta, delta_ids, finished, reason, metrics)

    @staticmethod
    def _require(declared: bool, capability: str) -> None:
        if not declared:
            raise NotSupportedError(f"this FakeLLM does not declare {capability!r}")

    def _check_prompt(self, prompt: Prompt) -> None:
        if isinstance(prompt, list) and not self.capabilities.segments:
            if any(isinstance(p, Segment) for p in prompt):
                raise NotSupportedError("this FakeLLM takes no Segment prompts")

    async def prefill(
        self,
        prompt: Prompt,
        priority: int = 0,
        pin: str | None = None,
        request_id: str | None = None,
    ) -> RequestOutput | None:
        """Records the prefill; a pin holds the prompt's tokens, as the engine's do. None
        when the pin is held already (nothing to compute)."""
        self._require(self.capabilities.prefill, "prefill")
        self._check_prompt(prompt)
        rid = self._new_id(request_id)
        if pin is not None and pin in self.pins:
            return None
        self.prefills.append((prompt, pin))
        tokens = _count_tokens(prompt, self.tokenizer or FakeTokenizer())
        if pin is not None:
            self.pins[pin] = tokens
        return RequestOutput(rid, "", [], "", [], True, "length", _metrics(tokens, 0, 0))

    async def unpin(self, pin: str) -> bool:
        return self.pins.pop(pin, None) is not None

    async def pinned(self) -> dict[str, int]:
        return dict(self.pins)

    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        """Records the chunks (a FakeLLM has no KV to compute); counts them as computed."""
        self._require(self.capabilities.chunks, "chunks")
        self.warmed.append(list(chunks))
        return len(chunks)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.aborted = True
            stream.running.set()

    async def pause(self, request_id: str, tool: str | None = None) -> None:
        self._require(self.capabilities.pause, "pause")
        self._stream(request_id).running.clear()

    async def resume(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Records what was appended (the reply goes on as it was) and lets it run."""
        self._require(self.capabilities.pause, "pause")
        stream = self._stream(request_id)
        if stream.running.is_set():
            raise InvalidRequestError(f"request {request_id!r} is not paused")
        self.resumed.append((request_id, extra, params))
        stream.running.set()

    def _stream(self, request_id: str) -> _Stream:
        stream = self._streams.get(request_id)
        if stream is None:
            raise InvalidRequestError(f"unknown or finished request {request_id!r}")
        return stream

    async def stats(self) -> EngineStats:
        running = sum(s.running.is_set() for s in self._streams.values())
        pinned_blocks = sum(n // BLOCK_SIZE for n in self.pins.values())
        return EngineStats(
            model=self.model_name,
            block_size=BLOCK_SIZE,
            kv_blocks_total=1024,
            kv_blocks_used=len(self._streams),
            kv_blocks_cached=0,
            kv_blocks_pinned=pinned_blocks,
            prefix_cache_queried_tokens=0,
            prefix_cache_hit_tokens=0,
            num_waiting=0,
            num_running=running,
            num_paused=len(self._streams) - running,
        )

    async def close(self) -> None:
        self.closed = True
        for rid in list(self._streams):
            await self.abort(rid)

    def times(self, event: str, var: str) -> list[float]:
        """Times of `event` for requests of output variable `var` (e.g. "argue_for.argument")."""
        return [t for e, rid, t in self.log if e == event and f":{var}" in rid]
