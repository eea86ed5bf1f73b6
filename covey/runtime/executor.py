"""`Runtime`: run an optimized Plan against an in-process engine with asyncio.

A node starts the moment its `deps` are done, so independent nodes overlap and sibling LLM
calls reach the engine in the same event-loop turn, where the scheduler batches them and
prefills their common prefix once. While a call waits on other nodes, the prefix of its
prompt already known (static text, inputs, outputs of nodes that finished) is prefilled
into the prefix cache, and its static start is pinned once per app (`PrefillAhead`), so
the call finds them computed. The first failing node cancels everything still running
and surfaces as one `NodeExecutionError` naming it; a run past its timeout raises
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

from covey.errors import (
    AppTimeoutError,
    InvalidRequestError,
    NodeExecutionError,
    RuntimeExecutionError,
)
from covey.graph.app import App
from covey.graph.ir import Retrieve, Var
from covey.graph.lowering import Primitive
from covey.graph.plan import NodePlan, Plan
from covey.runtime.events import Event, NodeFinished, NodeStarted, RunFinished, TokenDelta
from covey.runtime.nodes import NodeEnv, run_node, stream_generate
from covey.runtime.prefill_ahead import PrefillAhead
from covey.runtime.trace import Trace


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, Any]
    trace: Trace


def _tokenizer(llm: Any) -> Any:
    """`AsyncLLM` keeps its tokenizer on the wrapped engine; test doubles may hold it."""
    tok = getattr(llm, "tokenizer", None)
    return tok if tok is not None else getattr(getattr(llm, "engine", None), "tokenizer", None)


def _on_cpu(llm: Any) -> bool:
    device = getattr(getattr(llm, "engine", None), "device", None)
    return device is None or device.type == "cpu"


class Runtime:
    """Runs apps on one engine; `retrievers` maps the index names of `retrieve` nodes to a
    `DocumentIndex`, a `Retriever` or anything with `search(query, k, mode)`."""

    def __init__(
        self,
        llm: Any,
        retrievers: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        optimize: bool = True,
    ) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.llm = llm
        self.retrievers: dict[str, Any] = dict(retrievers or {})
        self.timeout_s = timeout_s
        self.optimize = optimize
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

    async def unpin_all(self) -> None:
        """Let the engine evict the static prefixes this runtime pinned."""
        unpin = getattr(self.llm, "unpin", None)
        if unpin is not None:
            for key in self.pins:
                await unpin(key)
        self.pins.clear()

    def bind_retriever(self, name: str, retriever: Any) -> None:
        """Serve `retrieve(..., index=name)` nodes from `retriever`."""
        self.retrievers[name] = retriever

    def set_timeout(self, app: str, timeout_s: float) -> None:
        """A timeout for one app (by name), overriding the runtime-wide one."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._timeouts[app] = timeout_s

    async def run(self, app: App | Plan, **inputs: Any) -> dict[str, Any]:
        """Run `app` on `inputs`; returns output name -> value."""
        return (await self.run_traced(app, **inputs)).outputs

    async def run_traced(self, app: App | Plan, **inputs: Any) -> RunResult:
        """Like `run`, with the run's trace (node times, tokens, prefix-cache hits)."""
        result: RunResult | None = None
        async for event in self.stream(app, **inputs):
            if isinstance(event, RunFinished):
                result = RunResult(event.outputs, event.trace)
        if result is None:
            raise RuntimeExecutionError("the run ended without a result")
        return result

    async def stream(self, app: App | Plan, **inputs: Any) -> AsyncIterator[Event]:
        """Yield node events and output token deltas as they happen, then `RunFinished`.

        Closing the iterator early cancels the run and its engine requests.
        """
        plan = self.plan_for(app)
        self._check(plan, inputs)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        task = asyncio.ensure_future(self._run(plan, inputs, queue.put_nowait))
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
        listing = ", ".join(plan.inputs) or "none"
        missing = [n for n in plan.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in plan.inputs]
        if missing or unknown:
            what = f"missing {missing}" if missing else f"unknown {unknown}"
            raise InvalidRequestError(f"app {plan.app!r}: {what} input(s) (inputs: {listing})")
        for node in plan.nodes.values():
            op = node.op
            if isinstance(op, Retrieve) and op.index not in self.retrievers:
                bound = ", ".join(self.retrievers) or "none"
                raise RuntimeExecutionError(
                    f"app {plan.app!r}, node {node.name!r}: no retriever bound to index "
                    f"{op.index!r} (bound: {bound}); call runtime.bind_retriever({op.index!r}, "
                    "index)"
                )

    async def _run(self, plan: Plan, inputs: dict[str, Any], emit: Callable[[Event], None]) -> None:
        trace = Trace(plan.app, uuid.uuid4().hex[:12])
        timeout = self._timeouts.get(plan.app, self.timeout_s)
        try:
            async with asyncio.timeout(timeout):
                outputs = await self._schedule(plan, inputs, trace, emit)
        except TimeoutError:
            running = sorted(n.node for n in trace.nodes.values() if n.status != "ok")
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
            _tokenizer(self.llm),
            self.retrievers,
            sequential=not self.optimize,
            search_inline=_on_cpu(self.llm),
        )
        pending, done = dict(plan.nodes), set()
        running: dict[asyncio.Task[dict[str, Any]], NodePlan] = {}
        ahead = PrefillAhead(self.llm, plan, values, env.tokenizer, trace, self.pins)
        if self.optimize:
            ahead.start()
        try:
            while pending or running:
                ready = [n for n in pending.values() if set(n.deps) <= done]
                if not self.optimize:
                    ready = ready[:1] if not running else []  # one node at a time
                for node in ready:
                    del pending[node.name]
                    trace.start(node.name, node.kind)
                    emit(NodeStarted(node.name, node.kind, trace.now()))
                    running[asyncio.ensure_future(run_node(env, node))] = node
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    node = running.pop(task)
                    self._finish(node, task, values, trace, emit)
                    done.add(node.name)
                if self.optimize:
                    ahead.advance(n for n in pending.values() if not set(n.deps) <= done)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await ahead.cancel()
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
        emit(NodeFinished(node.name, node.kind, trace.now(), outputs))

    def _generator(self, plan: Plan, trace: Trace, emit: Callable[[Event], None]):
        """The engine hook for LLM nodes; deltas of app output variables become events."""
        streamed = {v.name for v in plan.outputs.values() if isinstance(v, Var)}

        async def generate(node: NodePlan, prim: Primitive, prompt: Any, index: int | None):
            on_delta = None
            if prim.var in streamed:
                on_delta = partial(_delta, emit, node.name, str(prim.var), index)
            return await stream_generate(
                self.llm, trace, trace.run_id, node, prim, prompt, index, on_delta
            )

        return generate


def _delta(emit: Callable[[Event], None], node: str, var: str, index: int | None, text: str):
    emit(TokenDelta(node, var, text, index))
