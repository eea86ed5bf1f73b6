"""`Runtime`: run an optimized Plan against an engine with asyncio.

The engine is reached only through `EngineClient`, and what it offers beyond generation
is read from its declared capabilities (an engine without `prefill` gets no prefill
ahead; a gen with choices needs `choices`). Retrieve nodes call a bound `Searcher`.

A node starts the moment its `deps` are done, so independent nodes overlap and sibling LLM
calls reach the engine in the same event-loop turn, where the scheduler batches them and
prefills their common prefix once. While a call waits on other nodes, the prefix of its
prompt already known (static text, inputs, outputs of nodes that finished) is prefilled
into the prefix cache, and its static start is pinned once per app (`PrefillAhead`), so
the call finds them computed. When a retrieval returns and the engine has a chunk KV
store, its chunks' KV is loaded or computed at once (`ChunkWarmer`), while fusion and the
other nodes still run. The first failing node cancels everything still running
and surfaces as one `NodeExecutionError` naming it; a node in a route branch or loop iteration
that is not taken is skipped (`covey.runtime.branches`); a run past its timeout raises
`AppTimeoutError`. `optimize=False` is the naive baseline: the plan without passes, one
LLM call after the other, nothing prefilled ahead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from covey.checks import as_real
from covey.errors import (
    AppTimeoutError,
    ConfigError,
    NodeExecutionError,
    NotSupportedError,
    RetrieverNotBoundError,
)
from covey.graph.app import App
from covey.graph.call_inputs import bind_inputs
from covey.graph.ir import Retrieve, Var
from covey.graph.lowering import Primitive
from covey.graph.plan import NodePlan, Plan
from covey.llm_backend.engine_client import EngineClient
from covey.retrieval.searcher import Searcher
from covey.runtime.branches import is_control, run_control, skip_closed
from covey.runtime.chunk_warming import ChunkWarmer
from covey.runtime.events import (
    Event,
    NodeFinished,
    NodeStarted,
    PromptRendered,
    RunFinished,
    TokenDelta,
    drain,
)
from covey.runtime.nodes import NodeEnv, run_node, stream_generate
from covey.runtime.prefill_ahead import PrefillAhead
from covey.runtime.prompt_text import prompt_text
from covey.runtime.tool_pool import ToolPool
from covey.runtime.trace import Trace


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, Any]
    trace: Trace


class Runtime:
    """Runs apps on one engine (any `EngineClient`); `retrievers` maps the index names of
    `retrieve` nodes to a `Searcher` (a `DocumentIndex`, a `Retriever` or a user's own)."""

    def __init__(
        self,
        llm: EngineClient,
        retrievers: dict[str, Searcher] | None = None,
        timeout_s: float | None = None,
        optimize: bool = True,
        tools: ToolPool | None = None,
    ) -> None:
        if not isinstance(llm, EngineClient):
            raise ConfigError(
                f"Runtime needs an EngineClient (e.g. covey.llm_backend.AsyncLLM), got "
                f"{type(llm).__name__}"
            )
        self.llm = llm
        self.retrievers: dict[str, Searcher] = {}
        for name, searcher in (retrievers or {}).items():
            self.bind_retriever(name, searcher)
        self.timeout_s = _check_timeout(timeout_s)
        self.optimize = optimize
        self.tools = tools if tools is not None else ToolPool()  # apart from @function nodes
        self._timeouts: dict[str, float] = {}
        self._naive_plans: dict[App, Plan] = {}
        self.pins: set[str] = set()  # prefixes this runtime pinned in the engine

    def plan_for(self, app: App | Plan) -> Plan:
        """The plan a run executes: the app's optimized plan, or with `optimize=False` the
        plan no pass touched (a Plan given as is runs as given)."""
        if isinstance(app, Plan):
            return app
        if self.optimize:
            return app.plan
        if app not in self._naive_plans:
            self._naive_plans[app] = app.optimize(passes=())
        return self._naive_plans[app]

    def explain(self, app: App | Plan) -> str:
        """The plan a run executes, as text, ending with the features this runtime's engine
        turns off (a remote engine has no KV access: no prefill ahead, no chunk reuse)."""
        return self.plan_for(app).explain(self.llm.capabilities, self.llm.model_name)

    async def unpin_all(self) -> None:
        """Let the engine evict the static prefixes this runtime pinned."""
        for key in self.pins:
            await self.llm.unpin(key)
        self.pins.clear()

    def bind_retriever(self, name: str, retriever: Searcher) -> None:
        """Serve `retrieve(..., index=name)` nodes from `retriever`."""
        if not isinstance(retriever, Searcher):
            raise ConfigError(
                f"retriever {name!r} must be a Searcher, with search(query, k=None, mode=None, "
                f"sources=None) (a DocumentIndex or a Retriever); got {type(retriever).__name__}"
            )
        self.retrievers[name] = retriever

    def set_timeout(self, app: str, timeout_s: float) -> None:
        """A timeout for one app (by name), overriding the runtime-wide one."""
        self._timeouts[app] = _check_timeout(timeout_s)

    async def run(self, app: App | Plan, /, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Run `app` on its inputs (positional ones in declared order); returns output name
        -> value."""
        return (await self.run_traced(app, *args, **inputs)).outputs

    async def run_traced(
        self, app: App | Plan, /, *args: Any, record_prompts: bool = False, **inputs: Any
    ) -> RunResult:
        """Like `run`, with the run's trace (node times, tokens, prefix-cache hits);
        `record_prompts=True` also records each LLM request's exact prompt text in it."""
        events = self.stream(app, *args, record_prompts=record_prompts, **inputs)
        finished = await drain(events)
        return RunResult(finished.outputs, finished.trace)

    async def stream(
        self, app: App | Plan, /, *args: Any, record_prompts: bool = False, **inputs: Any
    ) -> AsyncIterator[Event]:
        """Yield node events and output token deltas as they happen, then `RunFinished`.

        Inputs are bound and validated against their declared types first (`AppInputError`).
        With `record_prompts`, a `PromptRendered` event precedes each LLM request and the
        trace keeps its prompt. Closing the iterator early cancels the run and its engine
        requests, and returns once they are aborted and their KV freed.
        """
        plan = self.plan_for(app)
        if isinstance(app, App):
            inputs = app.bind(*args, **inputs)
        else:
            inputs = bind_inputs(plan.app, plan.inputs, args, inputs, plan.defaults)
        self._check(plan, inputs)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        run = self._run(plan, inputs, queue.put_nowait, record_prompts)
        task = asyncio.ensure_future(run)
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _check(self, plan: Plan, inputs: dict[str, Any]) -> None:
        """Refuse a run that cannot succeed before any node starts."""
        for node in plan.nodes.values():
            op = node.op
            if isinstance(op, Retrieve) and op.index not in self.retrievers:
                bound = ", ".join(self.retrievers) or "none"
                raise RetrieverNotBoundError(
                    f"app {plan.app!r}, node {node.name!r}: no retriever bound to index "
                    f"{op.index!r} (bound: {bound}); call runtime.bind_retriever({op.index!r}, "
                    "index)"
                )
            if any(p.choices for p in node.primitives) and not self.llm.capabilities.choices:
                raise NotSupportedError(
                    f"app {plan.app!r}, node {node.name!r}: its gen has choices, which the "
                    f"engine ({self.llm.model_name}) cannot constrain outputs to"
                )

    async def _run(
        self,
        plan: Plan,
        inputs: dict[str, Any],
        emit: Callable[[Event], None],
        record_prompts: bool = False,
    ) -> None:
        trace = Trace(plan.app, uuid.uuid4().hex[:12], record_prompts=bool(record_prompts))
        timeout = self._timeouts.get(plan.app, self.timeout_s)
        try:
            async with asyncio.timeout(timeout):
                outputs = await self._schedule(plan, inputs, trace, emit)
        except TimeoutError:
            done = ("ok", "skipped")
            running = sorted(n.node for n in trace.nodes.values() if n.status not in done)
            raise AppTimeoutError(
                f"app {plan.app!r} timed out after {timeout}s; still running: "
                f"{', '.join(running) or 'none'}"
            ) from None
        trace.end = trace.now()
        emit(RunFinished(outputs, trace))

    async def _schedule(
        self, plan: Plan, inputs: dict[str, Any], trace: Trace, emit: Callable[[Event], None]
    ) -> dict[str, Any]:
        """Start every node whose deps are done; the first failure cancels the rest."""
        values: dict[str, Any] = dict(inputs)
        generate = self._generator(plan, trace, emit)
        env = NodeEnv(
            values,
            generate,
            self.llm.tokenizer,
            self.retrievers,
            trace,
            sequential=not self.optimize,
            search_inline=self.llm.capabilities.computes_on_loop_thread,
            text_prompts=not self.llm.capabilities.segments,
            llm=self.llm,
            tools=self.tools,
            on_delta=self._delta_hook(plan, emit),
        )
        pending, done = dict(plan.nodes), set()
        running: dict[asyncio.Task[dict[str, Any]], NodePlan] = {}
        ahead = PrefillAhead(self.llm, plan, values, env.tokenizer, trace, self.pins)
        warmer = ChunkWarmer(self.llm, trace)
        warmer.enabled = warmer.enabled and self.optimize
        if self.optimize:
            ahead.start()
        try:
            while pending or running:
                skip_closed(pending, done, values, trace)  # untaken branches, unneeded loops
                ready = [n for n in pending.values() if set(n.deps) <= done]
                if not self.optimize:
                    ready = ready[:1] if not running else []  # one node at a time
                for node in ready:
                    del pending[node.name]
                    trace.start(node.name, node.kind)
                    emit(NodeStarted(node.name, node.kind, trace.now()))
                    runner = run_control if is_control(node) else run_node
                    running[asyncio.ensure_future(runner(env, node))] = node
                if not running:
                    continue  # everything left was skipped
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    node = running.pop(task)
                    self._finish(node, task, values, trace, emit)
                    done.add(node.name)
                    if isinstance(node.op, Retrieve):
                        warmer.start(node.name, task.result()["results"])
                if self.optimize:
                    ahead.advance(n for n in pending.values() if not set(n.deps) <= done)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await ahead.cancel()
            await warmer.cancel()
            for node in running.values():
                trace.finish(node.name, "cancelled")
        return {name: values[var.name] for name, var in plan.outputs.items()}

    @staticmethod
    def _finish(
        node: NodePlan,
        task: asyncio.Task[dict[str, Any]],
        values: dict[str, Any],
        trace: Trace,
        emit: Callable[[Event], None],
    ) -> None:
        """Store a finished node's outputs, or turn its failure into the run's error."""
        exc = task.exception()
        if exc is not None:
            trace.finish(node.name, "failed", f"{type(exc).__name__}: {exc}")
            raise NodeExecutionError(
                f"node {node.name!r} ({node.kind}) failed: {type(exc).__name__}: {exc}",
                node.name,
            ) from exc
        outputs = task.result()
        for name, value in outputs.items():
            values[f"{node.name}.{name}"] = value
        trace.finish(node.name)
        trace.nodes[node.name].outputs = outputs
        emit(NodeFinished(node.name, node.kind, trace.now(), outputs))

    @staticmethod
    def _delta_hook(plan: Plan, emit: Callable[[Event], None]):
        """Token deltas of app output variables, for nodes that stream on their own."""
        streamed = {v.name for v in plan.outputs.values() if isinstance(v, Var)}

        def on_delta(node: NodePlan, var: str, index: int | None, text: str) -> None:
            if var in streamed:
                emit(TokenDelta(node.name, var, text, index))

        return on_delta

    def _generator(self, plan: Plan, trace: Trace, emit: Callable[[Event], None]):
        """The engine hook for LLM nodes; deltas of app output variables become events."""
        streamed = {v.name for v in plan.outputs.values() if isinstance(v, Var)}

        async def generate(node: NodePlan, prim: Primitive, prompt: Any, index: int | None):
            on_delta = None
            if prim.var in streamed:
                on_delta = partial(_delta, emit, node.name, str(prim.var), index)
            text = None
            if trace.record_prompts:
                text = prompt_text(prompt, self.llm.tokenizer)
                emit(PromptRendered(node.name, str(prim.var), text, index))
            return await stream_generate(
                self.llm, trace, trace.run_id, node, prim, prompt, index, on_delta, text
            )

        return generate


def _check_timeout(timeout_s: float | None) -> float | None:
    """A timeout in seconds: a positive number, or None for none."""
    if timeout_s is None:
        return None
    return as_real("timeout_s", timeout_s, gt=0, finite=False, error=ConfigError)


def _delta(emit: Callable[[Event], None], node: str, var: str, index: int | None, text: str):
    emit(TokenDelta(node, var, text, index))
