"""How each kind of node runs: LLM calls, retrievals, tools and functions, fan-outs.

Every runner takes the node's resolved inputs and returns its outputs by name; the
executor decides when to start it and where the outputs go.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from covey.errors import EngineError, RuntimeExecutionError
from covey.graph.ir import LLMCall, MapOp, PyCall, Retrieve, Var, llm_template
from covey.graph.lowering import Primitive
from covey.graph.plan import NodePlan
from covey.llm_backend.engine_client import ChatTokenizer, EngineClient
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import FinishReason
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.retriever import Retriever
from covey.retrieval.searcher import Searcher
from covey.runtime.render import Context
from covey.runtime.tool_loop import run_tool_llm, tools_of
from covey.runtime.tool_pool import ToolFailedError, ToolPool
from covey.runtime.trace import RequestTrace, SearchTrace, Trace

# (node, primitive, prompt, fan-out index) -> (text, token ids)
Generate = Callable[[NodePlan, Primitive, Any, int | None], Awaitable[tuple[str, list[int]]]]


@dataclass
class NodeEnv:
    """What node runners need from the run: values so far, the engine hook, the searchers
    and the trace they record into."""

    values: dict[str, Any]
    generate: Generate
    tokenizer: ChatTokenizer | None
    retrievers: dict[str, Searcher]
    trace: Trace
    sequential: bool = False  # naive baseline: fan-out elements one after the other
    search_inline: bool = True  # covey's indexes search on the loop thread (CPU engines)
    text_prompts: bool = False  # the engine takes no Segment prompts: send plain text
    llm: EngineClient | None = None  # for nodes that hold one request across tool calls
    tools: ToolPool | None = None  # where @tool calls run (apart from @function nodes)
    on_delta: Callable[[NodePlan, str, int | None, str], None] = lambda *_: None


async def gather_all(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Like asyncio.gather, but the first failure cancels the rest before it propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def call_node_fn(env: NodeEnv, op: PyCall, kwargs: dict[str, Any]) -> Any:
    """A @tool runs in the tool pool (its own threads, a timeout, its return checked); a
    @function in asyncio's default threads."""
    if op.spec is not None:
        if env.tools is None:
            raise RuntimeExecutionError(f"tool {op.spec.name!r}: this run has no tool pool")
        try:
            return await env.tools.call(op.spec, kwargs)
        except ToolFailedError as e:  # a tool node fails with the tool's own exception
            if isinstance(e.__cause__, Exception):
                raise e.__cause__ from None
            raise
    return await call_python(op.fn, kwargs)


async def call_python(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Async callables are awaited; sync ones run in a thread so the loop keeps streaming."""
    if inspect.iscoroutinefunction(fn):
        return await fn(**kwargs)
    return await asyncio.to_thread(fn, **kwargs)


async def run_llm(
    env: NodeEnv, node: NodePlan, item: Any = None, index: int | None = None
) -> dict[str, str]:
    """Prefill the node's segments in order; each gen decodes on everything so far."""
    template = llm_template(node.op)
    if template is None:
        raise RuntimeExecutionError(f"node {node.name!r} is not an LLM call")
    if tools_of(node) is not None:
        return await run_tool_llm(env, node, item, index)
    ctx = Context(env.tokenizer, template.uses_roles, as_text=env.text_prompts)
    out: dict[str, str] = {}
    for prim in node.primitives:
        if prim.op == "prefill":
            value = None
            if prim.text is None:
                value = item if prim.per_item else env.values[str(prim.var)]
            ctx.add_prefill(prim, value)
            continue
        text, ids = await env.generate(node, prim, ctx.prompt(), index)
        out[str(prim.var).split(".", 1)[1]] = text
        ctx.add_generated(prim.role, text, ids)
    return out


async def run_retrieve(env: NodeEnv, node: NodePlan, op: Retrieve, query: str) -> list[Any]:
    """Search the bound `Searcher`; a k or mode the node gives overrides the searcher's own
    (None keeps it). The trace records the overrides the node gave.

    Next to an engine computing on the loop thread (CPU), covey's own searchers search on
    that thread too (milliseconds): their query embedding is a torch forward, and torch ops
    on a second thread slow the CPU engine down (see AsyncLLM). Otherwise searches run on a
    worker thread, so a slow one (a reranker, a remote store) never stalls the streams.
    """
    searcher = env.retrievers[op.index]
    search = partial(searcher.search, query, k=op.k, mode=op.mode)
    if env.search_inline and isinstance(searcher, Retriever | DocumentIndex):
        results = list(search())
    else:
        results = list(await asyncio.to_thread(search))
    env.trace.nodes[node.name].search = SearchTrace(op.index, op.k, op.mode, len(results))
    return results


async def run_map(env: NodeEnv, node: NodePlan, args: dict[str, Any]) -> dict[str, list[Any]]:
    """Fan out over the item list; outputs become lists in element order."""
    op = node.op
    if not isinstance(op, MapOp):
        raise RuntimeExecutionError(f"node {node.name!r} is not a fan-out")
    items = list(args[op.item])
    if isinstance(op.inner, LLMCall):
        calls = [partial(run_llm, env, node, item, i) for i, item in enumerate(items)]
    else:
        inner = op.inner
        calls = [partial(call_node_fn, env, inner, {**args, op.item: item}) for item in items]
    if env.sequential:
        results = [await call() for call in calls]
    else:
        results = await gather_all([call() for call in calls])
    if isinstance(op.inner, PyCall):
        return {"result": results}
    return {name: [r[name] for r in results] for name in op.outputs}


async def run_node(env: NodeEnv, node: NodePlan) -> dict[str, Any]:
    """Run one node whose inputs are all resolved; returns output name -> value."""
    args = {
        port: env.values[arg.name] if isinstance(arg, Var) else arg.value
        for port, arg in node.args.items()
    }
    op = node.op
    if isinstance(op, LLMCall):
        return await run_llm(env, node)
    if isinstance(op, Retrieve):
        return {"results": await run_retrieve(env, node, op, args["query"])}
    if isinstance(op, PyCall):
        return {"result": await call_node_fn(env, op, args)}
    return await run_map(env, node, args)


async def stream_generate(
    llm: EngineClient,
    trace: Trace,
    run_id: str,
    node: NodePlan,
    prim: Primitive,
    prompt: Any,
    index: int | None,
    on_delta: Callable[[str], None] | None,
    recorded_prompt: str | None = None,
) -> tuple[str, list[int]]:
    """Submit one gen to the engine with the node's priority; record its cost in the trace
    (and `recorded_prompt`, the prompt's text, when the run records prompts)."""
    suffix = f":{index}" if index is not None else ""
    rid = f"{run_id}:{prim.var}{suffix}"
    params = prim.params or SamplingParams()
    if prim.choices:
        params = replace(params, choices=prim.choices)
    final = None
    async for out in llm.generate(prompt, params, request_id=rid, priority=node.priority):
        if on_delta is not None and out.delta_text:
            on_delta(out.delta_text)
        final = out
    if final is None or final.finish_reason == FinishReason.ABORT:
        raise EngineError(f"the engine aborted request {rid!r}")
    trace.nodes[node.name].requests.append(
        RequestTrace.of(
            rid,
            str(prim.var),
            final,
            prompt=recorded_prompt,
            choice_logprobs=final.choice_logprobs,
        )
    )
    if final.healed_text:  # the ids overlap the prompt's healed end: continue as text
        return final.text, []
    return final.text, list(final.token_ids)
