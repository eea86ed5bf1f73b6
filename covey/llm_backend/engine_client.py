"""`EngineClient`: the one interface through which the runtime, the apps and the server
reach an engine.

`AsyncLLM` implements it in-process. A remote OpenAI-compatible backend and Ray Serve
replicas will implement it too, so everything here is async and every argument and result
is plain data (str, ints, the `Segment`, `SamplingParams` and `RequestOutput` dataclasses)
that can cross a process boundary. What needs access to the engine's KV cache (early
prefill, pins, pause/resume) is optional: an engine declares what it offers in
`EngineCapabilities`, callers check the flag instead of probing attributes, and calling a
capability an engine lacks raises `NotSupportedError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment

Prompt = str | list[int] | list[Segment]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine offers beyond streaming generation.

    `prefill`: compute a prompt's KV into the prefix cache without generating, and pin it.
    `pause`: hold a request's KV across a tool call and resume it with more prompt.
    `choices`: constrain an output to exactly one of several strings.
    `segments`: accept prompts as `Segment` lists (chunk-aware KV reuse).
    `chunks`: a chunk KV store behind `segments`: chunk segments reuse KV computed by
    earlier requests, and `warm_chunks` loads chunks' KV ahead of the prompt.
    `computes_on_loop_thread`: the engine's compute runs on the caller's event-loop thread
    (a CPU engine); callers keep their own CPU-heavy work (index searches) on that thread
    too, since torch ops on a second thread slow the engine down.
    """

    prefill: bool = False
    pause: bool = False
    choices: bool = False
    segments: bool = False
    chunks: bool = False
    computes_on_loop_thread: bool = False


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load, for metrics, routing and `explain()`.

    KV figures are in blocks of `block_size` tokens and never overlap: `kv_blocks_used`
    hold live requests' KV (not counting pinned blocks they share), `kv_blocks_cached` idle
    prefix-cache entries (evictable), `kv_blocks_pinned` pinned prefixes (which yield to
    requests that need the room); the rest of `kv_blocks_total` is free. Prefix-cache hits
    count prompt tokens served from the cache since start. `chunk_cache` maps each tier of
    the chunk KV store ("pool", "host", "disk") to its counters (hits, misses, evictions,
    bytes, entries, reused_tokens, recomputed_tokens); empty when the engine has none.

    Requests paused for tool calls: `paused_bytes_preserved` of pool KV they hold now,
    `paused_bytes_swapped` of their KV in host memory now; since start, `swap_out_bytes` /
    `swap_in_bytes` copied, `pause_recompute_tokens` recomputed on resume after a discard,
    and `pause_decisions` (action -> count: "swap" / "discard" each time a paused request's
    KV was moved out or freed, "preserve" each step the adaptive policy, under pressure,
    kept one in the pool);
    `tool_seconds` maps each tool name to its mean pause-to-resume time ("" pools them).

    CPU threads: `num_threads` the engine's steps run on now (0: not known here), and
    `thread_decisions` ("fewer" / "more" -> count) the times the thread governor changed
    it since start (empty when the user chose the count; see thread_governor.py).
    """

    model: str
    block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_pinned: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_waiting: int
    num_running: int
    num_paused: int
    chunk_cache: dict[str, dict[str, int]] = field(default_factory=dict)
    paused_bytes_preserved: int = 0
    paused_bytes_swapped: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    pause_recompute_tokens: int = 0
    pause_decisions: dict[str, int] = field(default_factory=dict)
    tool_seconds: dict[str, float] = field(default_factory=dict)
    num_threads: int = 0
    thread_decisions: dict[str, int] = field(default_factory=dict)

    @property
    def queue_depth(self) -> int:
        return self.num_waiting

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0

    @property
    def kv_usage(self) -> float:
        """The share of the pool live requests hold (pinned and idle cached blocks aside)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class CacheReport:
    """What an engine's caches hold of some prompts, and what its next prefill costs: the
    answer a cache-aware router needs from a replica (`CacheReporter.cache_report`).

    `cached_tokens[i]`: the leading tokens of the i-th prompt asked about that the prefix
    cache holds now; `chunks_stored[i]`: whether the chunk store holds the i-th chunk's KV
    (None when the engine has no chunk store). `queued_prefill_tokens`: prompt tokens
    waiting or running that still have to be prefilled (a waiting prompt's cached prefix
    not counted). `prefill_fixed_s` + `prefill_per_token_s` x n: this engine's measured
    seconds to prefill n tokens (`prefill_profile.py`).
    """

    cached_tokens: tuple[int, ...]
    chunks_stored: tuple[bool, ...] | None
    queued_prefill_tokens: int
    prefill_fixed_s: float
    prefill_per_token_s: float


@runtime_checkable
class CacheReporter(Protocol):
    """An engine that can say what its caches hold. Apart from `EngineClient` on purpose:
    only a router in front of several engines asks, and engines that cannot answer (a
    remote OpenAI backend) raise `NotSupportedError`."""

    async def cache_report(
        self, prompts: list[list[int]], chunks: list[list[int]]
    ) -> CacheReport:
        """The engine's `CacheReport` for these prompts and chunks (token ids). Reading it
        changes nothing: no cache entry becomes more recently used."""
        ...


@runtime_checkable
class ChatTokenizer(Protocol):
    """The part of a tokenizer callers use: the model's chat template and token counts."""

    def apply_chat_template(
        self, messages: Messages, add_generation_prompt: bool = True
    ) -> str: ...

    def encode(self, text: str) -> list[int]: ...


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the layers above see it. Every method may raise a `CoveyError`:
    `InvalidRequestError` for a bad request, `NotSupportedError` for a capability the engine
    lacks, `EngineError` for a failure while serving (which fails that request only)."""

    @property
    def model_name(self) -> str: ...

    @property
    def capabilities(self) -> EngineCapabilities: ...

    @property
    def tokenizer(self) -> ChatTokenizer | None:
        """None when the model has none (dummy weights): prompts must then be token ids."""
        ...

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs, the last one `finished` (reason "stop", "length" or
        "abort"). A turn that pauses for a tool yields an output with finish_reason "paused"
        and finished=False; the stream stays open and continues after `resume`. A request
        that fails while being served raises `EngineError` from the stream instead of
        yielding an output with reason "error". Closing the iterator early (paused or not)
        aborts the request and frees its KV."""
        ...

    async def prefill(
        self,
        prompt: Prompt,
        priority: int = 0,
        pin: str | None = None,
        request_id: str | None = None,
    ) -> RequestOutput | None:
        """Compute `prompt`'s KV into the prefix cache, generating nothing; `pin` holds it
        there until `unpin(pin)`, or until requests need its room (a pin is an optimisation
        and yields). None when nothing had to be computed. (`prefill`.)"""
        ...

    async def unpin(self, pin: str) -> bool:
        """Let a pinned prefix be evicted again; False if `pin` was not pinned."""
        ...

    async def pinned(self) -> dict[str, int]:
        """Pin key -> tokens it holds in the prefix cache (empty without `prefill`)."""
        ...

    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        """Make the chunk store's host tier hold these chunk segments' KV, loaded from a
        lower tier, so a prompt that reads them soon reuses it; `compute` also computes
        the missing ones standalone (KV that only blending can use, at a measured quality
        cost). Returns how many were loaded or computed. (`chunks`.)"""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request now; its stream ends with a finished output, reason "abort"."""
        ...

    async def pause(self, request_id: str, tool: str | None = None) -> None:
        """Hold a running request aside, keeping its context, or, for a request whose turn
        already paused (`SamplingParams.pause_on_stop` / `pause_at_end`: its last output
        has finished=False and finish_reason "paused"), record which `tool` it waits for.
        The engine learns each tool's pause-to-resume time and decides from it whether a
        paused request's KV stays, moves to host memory or is recomputed (`pause`)."""
        ...

    async def resume(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Append `extra` (a tool's result) to a paused request and let it generate on; its
        stream (the same async iterator) goes on with the new turn (`pause`)."""
        ...

    async def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...
