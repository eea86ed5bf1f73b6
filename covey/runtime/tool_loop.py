"""Run an LLM node that uses tools: `{{call}}` tags between gens, and calls the model emits.

On an engine that can pause (`capabilities.pause`), the whole node is ONE engine request:
each gen is a turn that pauses when it ends (`pause_at_end`), the runtime runs the tool,
and `resume` appends the result (plus the template text up to the next gen) on top of the
KV already there; the engine's pause policy decides whether that KV stays in the pool, goes
to host memory or is recomputed, from the tool's duration history (`pause(..., tool=)`).
On an engine that cannot (a remote one), each turn is a fresh request over the whole
prompt so far; the prefix cache (where there is one) saves what it can.

Model-emitted calls: a gen of a function with `tools=[...]` also stops at `</tool_call>`
(kept in its text). The call is parsed and validated (`tool_calls.py`); a valid one runs in
the `ToolPool`, anything else is never run and the model gets an error text instead. The
result is appended as `<tool_result>...</tool_result>` and the same gen goes on, until it
ends without a call. The gen's output value is its text after the last tool result (the
answer); the calls and their results are in the node's trace (`NodeTrace.tool_calls`).

A tool that raises, times out or returns the wrong type resumes the request with an error
result ("error: ..."); the node goes on. A node cancelled while its request is paused
aborts that request, which frees its KV wherever it lies.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from covey.errors import CoveyError, EngineError, RuntimeExecutionError
from covey.graph.ir import Var, llm_template
from covey.graph.lowering import Primitive
from covey.graph.plan import NodePlan
from covey.graph.tools import CALL_CLOSE, ToolBox, ToolSpec, result_text
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import FinishReason
from covey.runtime.render import Context, to_text
from covey.runtime.tool_calls import BadCall, call_body, parse_call
from covey.runtime.trace import RequestTrace, ToolCallTrace

PAUSED = "paused"


class OutOfSync(RuntimeExecutionError):
    """The chat template re-rendered earlier text differently, so the paused request's
    context cannot be extended by appending."""


def tools_of(node: NodePlan) -> ToolBox | None:
    op = node.op
    return getattr(getattr(op, "inner", op), "tools", None)


def _tool_params(params: SamplingParams, box: ToolBox) -> SamplingParams:
    """A gen the model may call tools from also stops at the call's end, kept in its text."""
    if not box.offered:
        return params
    return replace(params, stop=(*params.stop, CALL_CLOSE), include_stop_str_in_output=True)


def _strip_stop(text: str, params: SamplingParams) -> str:
    """Drop a user stop string kept only because tool gens keep their stop strings."""
    for s in params.stop:
        if text.endswith(s):
            return text[: -len(s)]
    return text


class FreshTurns:
    """Each turn a new request over the whole prompt so far (an engine without pause)."""

    def __init__(self, env: Any, node: NodePlan, index: int | None) -> None:
        self.env, self.node, self.index = env, node, index

    async def turn(
        self, ctx: Context, prim: Primitive, params: SamplingParams, last: bool
    ) -> tuple[str, list[int]]:
        text, ids = await self.env.generate(
            self.node, replace(prim, params=params), ctx.prompt(), self.index
        )
        ctx.add_generated(prim.role, text, ids)
        return text, ids

    async def waiting_for(self, tool: str) -> None:
        return None

    async def close(self) -> None:
        return None


class OneContext:
    """All turns of the node on one paused-and-resumed engine request."""

    def __init__(self, env: Any, node: NodePlan, index: int | None) -> None:
        self.env, self.node, self.index = env, node, index
        suffix = f":{index}" if index is not None else ""
        self.rid = f"{env.trace.run_id}:{node.name}{suffix}"
        self.stream: Any = None
        self.live = False  # the request exists in the engine (running or paused)
        self.synced_segments = 0  # plain prompts: segments the engine already holds
        self.synced_text = ""  # chat prompts: the rendering the engine already holds
        self.tail = ""  # text the engine holds past the visible output (a stop, an EOS)
        self.fresh: FreshTurns | None = None  # after an OutOfSync: fresh requests from then

    async def turn(
        self, ctx: Context, prim: Primitive, params: SamplingParams, last: bool
    ) -> tuple[str, list[int]]:
        if self.fresh is not None:
            return await self.fresh.turn(ctx, prim, params, last)
        llm = self.env.llm
        params = replace(params, pause_at_end=not last)
        if self.stream is None:
            self.stream = llm.generate(
                ctx.prompt(), params, request_id=self.rid, priority=self.node.priority
            ).__aiter__()
        else:
            try:
                extra = self._extra(ctx)
            except OutOfSync:
                await self.close()
                self.fresh = FreshTurns(self.env, self.node, self.index)
                return await self.fresh.turn(ctx, prim, replace(params, pause_at_end=False), last)
            await llm.resume(self.rid, extra, params)
        self.live = True
        final = None
        var = str(prim.var)
        while True:
            try:
                out = await anext(self.stream)
            except StopAsyncIteration:
                break
            if out.delta_text:
                self.env.on_delta(self.node, var, self.index, out.delta_text)
            final = out
            if out.finished or out.finish_reason == PAUSED:
                break
        if final is None or final.finish_reason in (FinishReason.ABORT, None):
            self.live = False
            raise EngineError(f"the engine aborted request {self.rid!r}")
        if final.finished:
            self.live = False
        _record(self.env, self.node, self.rid, var, final)
        ids = list(final.token_ids)
        ctx.add_generated(prim.role, final.text, ids)
        self._sync(ctx, final.text, ids)
        return final.text, ids

    def _sync(self, ctx: Context, text: str, ids: list[int]) -> None:
        if not ctx.uses_roles:
            self.synced_segments = len(ctx.segments)
            return
        self.synced_text = ctx.chat_rendering()[0]
        decode = getattr(self.env.tokenizer, "decode", None)
        full = decode(ids, skip_special_tokens=False) if decode is not None else text
        self.tail = full[len(text) :] if full.startswith(text) else ""

    def _extra(self, ctx: Context) -> Any:
        """What the context gained since the engine last held all of it."""
        if not ctx.uses_roles:
            extra = ctx.segments[self.synced_segments :]
            self.synced_segments = len(ctx.segments)
            return extra
        now = ctx.chat_rendering()[0]
        if not now.startswith(self.synced_text):
            raise OutOfSync(f"node {self.node.name!r}: the chat template re-rendered history")
        rest = now[len(self.synced_text) :]
        if self.tail and rest.startswith(self.tail):
            rest = rest[len(self.tail) :]  # e.g. the end-of-turn token the model wrote
        self.synced_text, self.tail = now, ""
        return rest

    async def waiting_for(self, tool: str) -> None:
        """Tell the engine which tool the paused request waits for (its pause policy uses
        that tool's duration history)."""
        if self.live:
            await self.env.llm.pause(self.rid, tool=tool)

    async def close(self) -> None:
        """Free the request if it is still held (paused after its last turn, or the node
        was cancelled or failed), then read its stream to the end so AsyncLLM lets go of
        it now rather than when the generator is collected."""
        if self.live:
            self.live = False
            await self.env.llm.abort(self.rid)
        if self.stream is None:
            return
        try:
            async with asyncio.timeout(5):
                while not (await anext(self.stream)).finished:
                    pass
                await anext(self.stream)
        except (StopAsyncIteration, TimeoutError, CoveyError):
            pass


def _record(env: Any, node: NodePlan, rid: str, var: str, out: Any) -> None:
    env.trace.nodes[node.name].requests.append(RequestTrace.of(rid, var, out))


async def _run_tool(env: Any, spec: ToolSpec, kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """The tool's result as prompt text, or ("error: ...", the error) when it failed."""
    try:
        return to_text(await env.tools.call(spec, kwargs)), None
    except CoveyError as e:
        return f"error: {e}", str(e)


def _call_args(env: Any, node: NodePlan, prim: Primitive, item: Any, out: dict[str, str]):
    args = {}
    for param, ref in prim.args:
        if ref in out:
            args[param] = out[ref]
            continue
        arg = node.args[ref]
        op = node.op
        if getattr(op, "item", None) == ref:
            args[param] = item
        else:
            args[param] = env.values[arg.name] if isinstance(arg, Var) else arg.value
    return args


async def run_tool_llm(
    env: Any, node: NodePlan, item: Any = None, index: int | None = None
) -> dict[str, str]:
    """Run the node's primitives in order: prefills, gens (with model calls), calls."""
    template = llm_template(node.op)
    box = tools_of(node)
    if template is None or box is None:
        raise RuntimeExecutionError(f"node {node.name!r} is not an LLM call with tools")
    ctx = Context(env.tokenizer, template.uses_roles, as_text=env.text_prompts)
    pausing = env.llm is not None and env.llm.capabilities.pause and not env.text_prompts
    session: Any = OneContext(env, node, index) if pausing else FreshTurns(env, node, index)
    decodes = [i for i, p in enumerate(node.primitives) if p.op == "decode"]
    out: dict[str, str] = {}
    attempts = 0
    try:
        for i, prim in enumerate(node.primitives):
            if prim.op == "prefill":
                value = None
                if prim.text is None:
                    value = item if prim.per_item else env.values[str(prim.var)]
                ctx.add_prefill(prim, value)
            elif prim.op == "call":
                spec = box.called[str(prim.tool)]
                kwargs = _call_args(env, node, prim, item, out)
                await session.waiting_for(spec.name)
                started = time.perf_counter()
                text, error = await _run_tool(env, spec, kwargs)
                _trace_call(env, node, spec.name, kwargs, text, error, started, "template")
                ctx.add_dynamic(prim.role, text)
            else:
                before = node.primitives[i - 1] if i else None
                lead = before.text or "" if before is not None and before.op == "prefill" else ""
                answer, attempts = await _gen_with_calls(
                    env, node, session, ctx, prim, lead, box, attempts, i == decodes[-1]
                )
                out[str(prim.var).split(".", 1)[1]] = answer
    finally:
        await session.close()
    return out


async def _gen_with_calls(
    env: Any,
    node: NodePlan,
    session: Any,
    ctx: Context,
    prim: Primitive,
    lead: str,
    box: ToolBox,
    attempts: int,
    last: bool,
) -> tuple[str, int]:
    """One gen; while the model ends a turn on a call, run it and let the gen go on.

    `lead`: the template text right before the gen; a template may open the call itself
    (`...<tool_call>{"name": "` primes a small model), so a call's body is looked for in
    it too. `attempts`: calls tried so far in this run, valid or not; at the cap the gen's
    turns no longer stop at a call, so nothing more runs (the last result says so)."""
    base = prim.params or SamplingParams()
    while True:
        can_call = bool(box.offered) and attempts < box.max_tool_calls
        params = _tool_params(base, box) if can_call else base
        text, _ = await session.turn(ctx, prim, params, last and not can_call)
        if params is not base and not base.include_stop_str_in_output:
            text = _strip_stop(text, base)
        body = call_body(lead + text) if can_call and text.endswith(CALL_CLOSE) else None
        lead = ""
        if body is None:
            return text, attempts
        attempts += 1
        call = parse_call(body[: -len(CALL_CLOSE)], box)
        started = time.perf_counter()
        if isinstance(call, BadCall):
            name, kwargs = call.tool or "?", {"call": body[: -len(CALL_CLOSE)].strip()}
            result, error = call.error, call.error
        else:
            name, kwargs = call.spec.name, call.kwargs
            await session.waiting_for(name)
            result, error = await _run_tool(env, call.spec, kwargs)
        _trace_call(env, node, name, kwargs, result, error, started, "model")
        if attempts >= box.max_tool_calls:
            result += f" (that was the last tool call allowed, {box.max_tool_calls}; answer now)"
        ctx.add_dynamic(prim.role, result_text(result))


def _trace_call(
    env: Any,
    node: NodePlan,
    tool: str,
    kwargs: dict[str, Any],
    result: str,
    error: str | None,
    started: float,
    by: str,
) -> None:
    env.trace.nodes[node.name].tool_calls.append(
        ToolCallTrace(tool, dict(kwargs), result, error, time.perf_counter() - started, by)
    )
