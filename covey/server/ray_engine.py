"""`RayEngine`: an `EngineClient` whose every call goes to one of several engine replicas
on Ray Serve, chosen by `ReplicaRouter` (cache-aware by default).

The runtime, the apps and the HTTP routes use it as they use an in-process `AsyncLLM`: it
offers the same capabilities (the replicas are covey engines), and a call that needs a
particular replica finds it: `abort`, `pause` and `resume` go to the replica running the
request, `unpin` to the one holding the pin, a re-pin to where the pin already is.

Failures: a call that fails because its replica died (the actor is gone or unreachable)
marks the replica down, makes the router forget everything it believed the replica held,
and then either retries the call once on another replica, when nothing of it has been
streamed yet, or fails it with `EngineUnavailableError` (HTTP 503) saying so. In pooled
mode (`--routing ray_serve`: one handle for all Serve replicas) a death marks nothing
down, since the other replicas behind the handle still serve: the call is retried once
through the same handle, and only Serve's controller saying no replica runs marks the
pool down. Ray Serve
replaces the dead replica; the report loop, which asks every replica for its load and pins
each `report_interval_s`, sees the replacement answer and puts it back in the set, empty.
Errors a replica raises on purpose (a bad request, an unsupported capability) arrive as
the same covey error classes, not as Ray's wrappers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from covey.errors import CoveyError, EngineError, EngineUnavailableError, RequestNotFoundError
from covey.llm_backend.engine_client import (
    ChatTokenizer,
    EngineCapabilities,
    EngineStats,
    Prompt,
)
from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from covey.server.replica_router import ReplicaRouter, route_key

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 5.0
LIVENESS_INTERVAL_S = 1.0
MEMBER_TTL_ROUNDS = 5  # report rounds a pool member may go unheard before it drops out
DOWN_POLL_S = 0.25  # how often a call with nothing received yet looks for its replica's death


class ReplicaDied(Exception):
    """Internal: the replica serving a call is gone (not the call's own fault)."""


@dataclass
class ReplicaState:
    name: str
    handle: Any
    up: bool = True
    pid: int | None = None
    stats: EngineStats | None = None
    deaths: int = 0
    retries: int = 0  # calls retried elsewhere after this replica died under them
    failed: int = 0  # calls failed with 503 after this replica died under them
    served: int = 0
    down_since: float | None = None
    pins: dict[str, int] = field(default_factory=dict)
    # Pooled only: each Serve replica behind the handle, by its pid, with when it last
    # answered a report and its stats (Serve picks which replica answers each report).
    members: dict[int, tuple[float, EngineStats]] = field(default_factory=dict)

    def member_stats(self, ttl_s: float) -> dict[int, EngineStats]:
        """Pooled: the Serve replicas heard from in the last `ttl_s` seconds (one that
        died or was replaced drops out); else this replica's own stats, under its pid."""
        if not self.members:
            return {self.pid or 0: self.stats} if self.stats is not None else {}
        now = time.monotonic()
        for pid in [p for p, (at, _) in self.members.items() if now - at > ttl_s]:
            del self.members[pid]
        return {pid: stats for pid, (_, stats) in self.members.items()}


class RayEngine:
    """Engine replicas (application name -> Serve handle) behind one `EngineClient`."""

    def __init__(
        self,
        handles: dict[str, Any],
        router: ReplicaRouter | None = None,
        *,
        tokenizer: ChatTokenizer | None = None,
        report_interval_s: float = 1.0,
        retry: bool = True,
        liveness: Callable[[list[str]], dict[str, int]] | None = None,
        pooled: bool = False,
        pool_size: int = 1,
    ) -> None:
        if not handles:
            raise EngineUnavailableError("a RayEngine needs at least one replica")
        self.replicas = {name: ReplicaState(name, h) for name, h in handles.items()}
        self.router = router or ReplicaRouter(list(handles))
        for name in handles:
            self.router.add(name)
        self.report_interval_s = report_interval_s
        self.retry = retry
        # name -> how many replicas Serve has RUNNING for it (`running_replicas`): the only
        # way to see a replica that died idle, since Serve's handle queues a call to a dead
        # replica until its replacement is up instead of failing it.
        self.liveness = liveness
        # Each handle fronts several Serve replicas that Serve's own router picks among
        # (Ray Serve's default routing, for comparison): a report from another process
        # than the last one is another replica, not a replacement.
        self.pooled = pooled
        # Pooled: the Serve replicas behind the handle. Each report round asks that many
        # reports at once, which Serve spreads over them (`ReplicaState.members`).
        self.pool_size = max(pool_size, 1) if pooled else 1
        self._tokenizer = tokenizer
        self._model = "(not connected)"
        self._capabilities = EngineCapabilities()
        self._running: dict[str, str] = {}  # request id -> replica name
        self._reporter: asyncio.Task[None] | None = None
        self._closed = False
        # Set by whoever deployed the replicas: deletes them (they drain) on close.
        self.on_close: Callable[[], None] | None = None

    # -- what the engine is -------------------------------------------------------------

    async def connect(self) -> RayEngine:
        """Ask every replica for its report (model, capabilities, load); returns self."""
        reports = await asyncio.gather(*(self._report(r) for r in self.replicas.values()))
        first = next((rep for rep in reports if rep is not None), None)
        if first is None:
            raise EngineUnavailableError("no engine replica answered")
        self._model = first.model
        # The front computes nothing: the replicas' compute is on their own threads.
        self._capabilities = replace(first.capabilities, computes_on_loop_thread=False)
        if self.pooled:
            # Serve's router picks any replica per call: a resume or a pinned prefix could
            # not find the replica holding its KV. Offered only where covey routes.
            self._capabilities = replace(self._capabilities, pause=False, prefill=False)
        return self

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._capabilities

    @property
    def tokenizer(self) -> ChatTokenizer | None:
        return self._tokenizer

    def _down(self) -> list[str]:
        return [r.name for r in self.replicas.values() if not r.up]

    def _elsewhere(self, tried: Sequence[str]) -> bool:
        """Whether a replica neither down nor tried is left to send a call to."""
        skip = set(self._down()) | set(tried)
        return any(name not in skip for name in self.replicas)

    def _choose(self, key: Any, tried: Sequence[str] = (), remember: bool = True) -> str:
        """The router's pick among the replicas up and not `tried`; when there is none, an
        `EngineUnavailableError` (503) that says which are down and for how long."""
        if not self._elsewhere(tried):
            now = time.monotonic()
            down = ", ".join(
                f"{r.name} for {now - r.down_since:.0f} s"
                for r in self.replicas.values()
                if not r.up and r.down_since is not None
            )
            raise EngineUnavailableError(
                f"no engine replica is up (down: {down or 'none'}; Ray Serve replaces a "
                "replica that died, which takes as long as loading the model): retry shortly"
            )
        return self.router.choose(key, exclude=self._down() + list(tried), remember=remember)[0]

    # -- generation ---------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        self._check_open()
        key = route_key(prompt)
        tried: list[str] = []
        retried = False
        while True:
            name = self._choose(key, tried)
            stamp = self.router.last_stamp
            replica = self.replicas[name]
            streamed = done = False
            stream = None
            try:
                self.router.started(name)
                if request_id is not None:
                    self._running[request_id] = name
                stream = replica.handle.generate.options(stream=True).remote(
                    prompt, params, request_id, priority
                )
                async for out in _first_while_up(_unwrapped(stream, replica), replica):
                    if not streamed:  # its prefill is done: no longer queued there
                        self.router.first_output(name, stamp)
                    streamed = True
                    if out.finished:  # counted now: a consumer may stop at the last output
                        replica.served += 1
                        done = True
                    yield out
                return
            except ReplicaDied as exc:
                if not self.pooled:
                    # A pool's handle stands for every Serve replica: one dying leaves the
                    # rest serving, and Serve's router drops it; only liveness (no replica
                    # running) marks a pool down. A pool is retried through the same handle.
                    self._mark_down(replica)
                    tried.append(name)
                rid = request_id or "(unnamed)"
                if streamed or not self.retry or retried:
                    replica.failed += 1
                    raise EngineUnavailableError(
                        f"engine replica {name} died while serving request {rid}; the "
                        f"service goes on, retry it ({exc})"
                    ) from None
                if not self._elsewhere(tried):  # else the router's bare "none available"
                    replica.failed += 1
                    raise EngineUnavailableError(
                        f"engine replica {name} died before streaming request {rid}, and no "
                        f"other replica is up to retry it on; Ray Serve is replacing it, "
                        f"retry shortly ({exc})"
                    ) from None
                replica.retries += 1
                retried = True
                log.warning("replica %s died before streaming %s; retrying", name, request_id)
            finally:
                self.router.finished(name)
                self.router.call_done(name, stamp)
                if request_id is not None and self._running.get(request_id) == name:
                    del self._running[request_id]
                if stream is not None and not done and not stream.cancelled():
                    stream.cancel()  # a consumer that went away aborts the replica's request

    async def prefill(
        self,
        prompt: Prompt,
        priority: int = 0,
        pin: str | None = None,
        request_id: str | None = None,
    ) -> RequestOutput | None:
        name = self._choose(route_key(prompt, pin))
        stamp = self.router.last_stamp
        try:
            return await self._call(name, "prefill", prompt, priority, pin, request_id)
        finally:
            self.router.call_done(name, stamp)
            if pin is not None:
                self.router.pin_settled(name, pin)

    async def unpin(self, pin: str) -> bool:
        holder = self.router.holder_of(pin)
        down = self._down()
        names = [holder] if holder is not None else [r for r in self.replicas if r not in down]
        done = await asyncio.gather(
            *(self._call(n, "unpin", pin) for n in names), return_exceptions=True
        )
        self.router.unpinned(pin)
        return any(d is True for d in done)

    async def pinned(self) -> dict[str, int]:
        """Every live replica's pins (pin keys are unique across replicas: the router
        sends a pin back to the replica holding it)."""
        merged: dict[str, int] = {}
        names = [n for n in self.replicas if n not in self._down()]
        seq = self.router.report_started()
        answers = await asyncio.gather(
            *(self._call(n, "pinned") for n in names), return_exceptions=True
        )
        for name, pins in zip(names, answers):
            if isinstance(pins, dict):
                merged.update(pins)
                self.router.report(name, self.router.views[name].reported_queue, pins, seq)
        return merged

    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        """Warm them on the replica a prompt made of these chunks would go to."""
        name = self._choose(route_key(chunks), remember=False)
        return await self._call(name, "warm_chunks", chunks, compute)

    async def abort(self, request_id: str) -> None:
        name = self._running.get(request_id)
        if name is not None:
            await self._call(name, "abort", request_id)

    async def pause(self, request_id: str) -> None:
        await self._call(self._owner(request_id), "pause", request_id)

    async def resume(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        await self._call(self._owner(request_id), "resume", request_id, extra, params)

    def _owner(self, request_id: str) -> str:
        name = self._running.get(request_id)
        if name is None:
            raise RequestNotFoundError(f"no running request {request_id!r}")
        return name

    # -- load, metrics ------------------------------------------------------------------

    async def stats(self, refresh: bool = False) -> EngineStats:
        """The live replicas' stats summed, as the report loop last heard them: a
        `/metrics` scrape costs no call to a replica (a busy or dead one would hold it up
        to `REPORT_TIMEOUT_S`). `refresh`: ask every replica first, down ones included
        (a replacement that answers is put back)."""
        self._ensure_reporter()
        if refresh or all(r.stats is None for r in self.replicas.values()):
            await asyncio.gather(
                *(self._report(r) for r in self.replicas.values() for _ in range(self.pool_size))
            )
        live = [
            stats
            for r in self.replicas.values()
            if r.up
            for stats in r.member_stats(self.member_ttl_s).values()
        ]
        return sum_stats(self._model, live)

    @property
    def member_ttl_s(self) -> float:
        """How long a pool member not heard from still counts: Serve may send several
        rounds of reports elsewhere before it picks that one again."""
        return MEMBER_TTL_ROUNDS * self.report_interval_s + REPORT_TIMEOUT_S

    def replica_states(self) -> list[ReplicaState]:
        return list(self.replicas.values())

    async def close(self) -> None:
        self._closed = True
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reporter
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            await asyncio.to_thread(on_close)

    async def __aenter__(self) -> RayEngine:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailableError("this RayEngine is closed")
        self._ensure_reporter()

    def _ensure_reporter(self) -> None:
        if self._reporter is None or self._reporter.done():
            with contextlib.suppress(RuntimeError):  # no running loop: started on first use
                self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        await asyncio.gather(self._reports_loop(), self._liveness_loop())

    async def _reports_loop(self) -> None:
        while not self._closed:
            await asyncio.gather(
                *(self._report(r) for r in self.replicas.values() for _ in range(self.pool_size))
            )
            await asyncio.sleep(self.report_interval_s)

    async def _liveness_loop(self) -> None:
        """Its own loop: a report to a dead replica waits out `REPORT_TIMEOUT_S`, and a
        timed-out report cannot tell dead from busy; Serve's controller can."""
        while self.liveness is not None and not self._closed:
            await self.check_liveness()
            await asyncio.sleep(LIVENESS_INTERVAL_S)

    async def check_liveness(self) -> None:
        """Mark down every replica Serve has no running replica for (dead, being replaced)."""
        if self.liveness is None:
            return
        try:
            running = await asyncio.wait_for(
                asyncio.to_thread(self.liveness, list(self.replicas)), REPORT_TIMEOUT_S
            )
        except Exception as exc:  # best effort, as reports are
            log.debug("Serve's status did not answer: %s", exc)
            return
        for name, count in running.items():
            replica = self.replicas.get(name)
            if replica is not None and replica.up and count < 1:
                self._mark_down(replica)

    async def _report(self, replica: ReplicaState) -> Any:
        """Ask one replica for its report; a dead one is marked down, a replacement that
        answers is put back (empty: the router forgot what its predecessor held)."""
        seq = self.router.report_started()
        response = None
        try:
            response = replica.handle.report.remote()
            rep = await asyncio.wait_for(_await(response, replica), REPORT_TIMEOUT_S)
        except ReplicaDied:
            if not self.pooled:  # Serve sent a pool's report to a dying replica: the rest serve
                self._mark_down(replica)
            return None
        except TimeoutError:
            # Busy, not dead: a report reads the caches on the engine's thread, after the
            # step running there, and a long prefill on a loaded machine can take longer
            # than the timeout. The last report stands; only Ray saying the actor is gone
            # marks a replica down. Cancelled there too: giving up here does not stop it,
            # and one report a second would queue up for the whole step (seen: 20 of them,
            # the oldest answered after 115 s).
            log.debug("replica %s is slow to report", replica.name)
            # Best effort: cancelling can itself fail (an assignment that failed at the
            # timeout, a replica gone), and a report must never fail the reports loop.
            with contextlib.suppress(Exception):
                response.cancel()
            return None
        except Exception as exc:  # a report is best effort; routing goes on without it
            log.debug("replica %s did not report: %s", replica.name, exc)
            return None
        if self.router.forgotten_since(replica.name, seq):
            # Asked for before a call saw it die: the answer may be the dead process's last
            # words, so it neither brings the replica back up nor its cache into the mirror.
            return None
        if replica.pid is not None and rep.pid != replica.pid and replica.up and not self.pooled:
            # Replaced between two reports, without a call seeing it die. This answer is the
            # replacement's own: fresh, though asked for before the router forgot the old one.
            self._mark_down(replica)
            seq = self.router.report_started()
        if not replica.up:
            log.warning("replica %s is back (pid %s)", replica.name, rep.pid)
            replica.up, replica.down_since = True, None
        replica.pid, replica.stats, replica.pins = rep.pid, rep.stats, rep.pins
        if self.pooled:
            replica.members[rep.pid] = (time.monotonic(), rep.stats)
        self.router.set_capacity(replica.name, rep.stats.kv_blocks_total * rep.stats.block_size)
        self.router.report(
            replica.name,
            rep.stats.num_waiting + rep.stats.num_running,
            rep.pins,
            seq,
            held=(rep.units, rep.chunks),
            prefill_tokens=rep.queued_prefill_tokens,
            profile=rep.prefill_profile,
            free_tokens=free_kv_tokens(rep.stats),
        )
        return rep

    def _mark_down(self, replica: ReplicaState) -> None:
        if replica.up:
            replica.up = False
            replica.deaths += 1
            replica.down_since = time.monotonic()
            replica.stats = None
            replica.members.clear()
            log.warning("replica %s is down; the router forgets what it held", replica.name)
        self.router.forget(replica.name)
        for rid in [rid for rid, n in self._running.items() if n == replica.name]:
            del self._running[rid]

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        replica = self.replicas[name]
        try:
            return await _await(getattr(replica.handle, method).remote(*args), replica)
        except ReplicaDied as exc:
            if not self.pooled:
                self._mark_down(replica)
            raise EngineUnavailableError(f"engine replica {name} is gone ({exc})") from None


async def _first_while_up(
    outputs: AsyncIterator[RequestOutput], replica: ReplicaState
) -> AsyncIterator[RequestOutput]:
    """`outputs`, but waiting for the first one only while `replica` is not marked down:
    a call sent to a replica that died idle is queued by Serve until the replacement has
    loaded (minutes), so once the liveness check marks it down the call is given up as
    `ReplicaDied` (nothing streamed: it can be retried elsewhere)."""
    deaths = replica.deaths
    first = asyncio.ensure_future(anext(outputs))
    try:
        while True:
            done, _ = await asyncio.wait({first}, timeout=DOWN_POLL_S)
            if done:
                break
            if replica.deaths != deaths or not replica.up:
                raise ReplicaDied(f"Serve reports replica {replica.name} is not running")
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await first
    try:
        yield first.result()
    except StopAsyncIteration:
        return
    async for out in outputs:
        yield out


def _replica_gone_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (
        ActorDiedError,
        ActorUnavailableError,
        RayActorError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )


def _unwrap(exc: BaseException) -> BaseException:
    """The covey error a replica raised, out of Ray's `RayTaskError` wrapper."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CoveyError):
            return cause
        if isinstance(cause, BaseException):
            return EngineError(f"an engine replica failed: {cause}")
    return exc


async def _await(ref: Any, replica: ReplicaState) -> Any:
    try:
        return await ref
    except _replica_gone_errors() as exc:
        raise ReplicaDied(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    except Exception as exc:
        raise _unwrap(exc) from None


async def _unwrapped(stream: Any, replica: ReplicaState) -> AsyncIterator[RequestOutput]:
    try:
        async for out in stream:
            yield out
    except _replica_gone_errors() as exc:
        raise ReplicaDied(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    except Exception as exc:
        # Ray raises a streamed error as `RayTaskError.as_instanceof_cause()`, a class that
        # is also the covey error's class: unwrap it first, or the client gets Ray's text.
        unwrapped = _unwrap(exc)
        if unwrapped is exc:
            raise
        raise unwrapped from None


def free_kv_tokens(stats: EngineStats) -> int:
    """Tokens of KV the engine can take without evicting a cached or pinned prefix."""
    free = stats.kv_blocks_total - stats.kv_blocks_used - stats.kv_blocks_cached
    return max(free - stats.kv_blocks_pinned, 0) * stats.block_size


def sum_stats(model: str, stats: list[EngineStats]) -> EngineStats:
    """One `EngineStats` for several engines: counts summed, chunk tiers summed per tier."""
    chunk: dict[str, dict[str, int]] = {}
    for s in stats:
        for tier, counters in s.chunk_cache.items():
            into = chunk.setdefault(tier, {})
            for k, v in counters.items():
                into[k] = into.get(k, 0) + v
    return EngineStats(
        model=model,
        block_size=stats[0].block_size if stats else 0,
        kv_blocks_total=sum(s.kv_blocks_total for s in stats),
        kv_blocks_used=sum(s.kv_blocks_used for s in stats),
        kv_blocks_cached=sum(s.kv_blocks_cached for s in stats),
        kv_blocks_pinned=sum(s.kv_blocks_pinned for s in stats),
        prefix_cache_queried_tokens=sum(s.prefix_cache_queried_tokens for s in stats),
        prefix_cache_hit_tokens=sum(s.prefix_cache_hit_tokens for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        num_running=sum(s.num_running for s in stats),
        num_paused=sum(s.num_paused for s in stats),
        chunk_cache=chunk,
    )
