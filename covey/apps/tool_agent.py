"""Tool agent: answer a question with a calculator and a Python-docs search, calling them
from inside the generation.

The model is offered the tools it may call (`semantic_function(tools=[...])`): it writes
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, its turn pauses (the request
keeps its context in the engine), the runtime checks the call against the tool's typed
arguments, runs it in the tool pool under its timeout, appends the result and the same
generation goes on. An invalid call or an unknown tool is never run: the model gets the
error instead. The tools come from a registry (`TOOLS`): the app offers only the ones it
was built with, and the model can call nothing else.

The embedded SmolLM2-135M rarely writes a well-formed call on its own; with a larger model
(`--model`) the same app calls its tools as intended. Either way the trace records every
call (`NodeTrace.tool_calls`).

Over an index of the user's own (`python_docs=False`, as `covey serve --index` builds it)
the prompt and the docs tool are worded without naming Python (`prompt_subject`): the model
sees a tool named `search_docs`, "Search the documents", where the default index offers
`python_docs`. The registry key stays `python_docs` (the `tools=` names are API).

Run it: `python -m covey.apps.tool_agent "What is 17 * 23?"` (add `--trace` to see the
calls); `covey serve` serves it as `POST /apps/tool_agent/invoke`.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import operator
import sys
from collections.abc import Callable
from typing import Any

import covey.graph as cg
from covey.errors import ConfigError, CoveyError
from covey.graph import App
from covey.graph.template import suggest
from covey.llm_backend.sampling_params import SamplingParams
from covey.retrieval.searcher import Searcher

ANSWER_MAX_TOKENS = 96
MAX_TOOL_CALLS = 3
DOCS_RESULTS = 2
DOCS_CHARS = 600
_BIGGEST = 10**12  # operands and results past this are refused: a calculator, not bignum
_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _number(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_number(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError(f"exponent {right} is too large")
        value = _OPS[type(node.op)](left, right)
    else:
        raise ValueError(f"only numbers and + - * / // % ** are allowed, not {ast.dump(node)}")
    if abs(value) > _BIGGEST:
        raise ValueError("the number is too large")
    return value


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression, as text (integers without a trailing .0)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _number(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


@cg.tool(timeout=2.0, description="Evaluate an arithmetic expression, e.g. 17 * (3 + 4).")
def calculator(expression: str) -> str:
    return evaluate(expression)


def docs_tool(searcher: Searcher | None, python_docs: bool = True) -> Any:
    """The Python-docs search tool over `searcher` (None: the default Python-docs index,
    opened, or built, on the first call); `python_docs=False`: the same search, named and
    described without Python, for an index of the user's own."""
    holder: dict[str, Searcher] = {}

    def find() -> Searcher:
        if searcher is not None:
            return searcher
        if "index" not in holder:
            from covey.retrieval.default_corpus import ensure_default_index

            holder["index"] = ensure_default_index(progress=False)
        return holder["index"]

    def search(query: str) -> str:
        results = find().search(query, k=DOCS_RESULTS)
        if not results:
            return "no results"
        return "\n\n".join(r.chunk.text[:DOCS_CHARS] for r in results)

    if not python_docs:

        @cg.tool(timeout=20.0, description="Search the documents; returns passages.")
        def search_docs(query: str) -> str:
            return search(query)

        return search_docs

    @cg.tool(timeout=20.0, description="Search the Python documentation; returns passages.")
    def python_docs(query: str) -> str:
        return search(query)

    return python_docs


# Registry name -> the tool, given the docs searcher and whether its index is Python's docs.
TOOLS: dict[str, Callable[[Searcher | None, bool], Any]] = {
    "calculator": lambda _, __: calculator,
    "python_docs": docs_tool,
}

AGENT_NEUTRAL = """{{#system}}
You are a careful assistant. Use a tool when it helps: the calculator for arithmetic,
search_docs for questions the documents answer. Answer in one or two sentences.
{{#user}}
{{question}}
{{#assistant}}
{{gen answer}}"""

AGENT = """{{#system}}
You are a careful assistant for Python programmers. Use a tool when it helps: the
calculator for arithmetic, python_docs for questions about Python. Answer in one or two
sentences.
{{#user}}
{{question}}
{{#assistant}}
{{gen answer}}"""


def build_tool_agent_app(
    docs: Searcher | None = None,
    tools: tuple[str, ...] = ("calculator", "python_docs"),
    max_tokens: int = ANSWER_MAX_TOKENS,
    max_tool_calls: int = MAX_TOOL_CALLS,
    python_docs: bool = True,
) -> App:
    """The app, offering the registry's `tools` by name; `docs` is the searcher the docs
    tool searches (None: the default Python-docs index). `python_docs=False` (an index of
    the user's own) words the prompt and the docs tool without naming Python."""
    for name in tools:
        if name not in TOOLS:
            raise ConfigError(
                f"tool_agent: no tool {name!r} in the registry{suggest(name, list(TOOLS))} "
                f"(tools: {', '.join(TOOLS)})"
            )
    offered = [TOOLS[name](docs, python_docs) for name in tools]

    def agent(question: str):
        pass

    agent.__doc__ = AGENT if python_docs else AGENT_NEUTRAL
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    fn = cg.semantic_function(params=params, tools=offered, max_tool_calls=max_tool_calls)(agent)

    @cg.app(name="tool_agent")
    def tool_agent(question: str):
        return fn(question)

    return tool_agent


async def _main(argv: list[str] | None = None) -> int:
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.runtime import Runtime

    parser = argparse.ArgumentParser(
        prog="python -m covey.apps.tool_agent", description="answer with tools"
    )
    parser.add_argument("question")
    parser.add_argument("--model", default=None, help="a model path (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=ANSWER_MAX_TOKENS)
    parser.add_argument("--trace", action="store_true", help="print each tool call")
    args = parser.parse_args(argv)
    app = build_tool_agent_app(max_tokens=args.max_tokens)
    async with AsyncLLM(args.model) as llm:
        runtime = Runtime(llm)
        try:
            result = await runtime.run_traced(app, question=args.question)
        finally:
            runtime.tools.close()
    if args.trace:
        for call in result.trace.nodes["agent"].tool_calls:
            print(f"[{call.tool}({call.arguments}) -> {call.result[:80]!r}]", file=sys.stderr)
    print(result.outputs["answer"])
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(_main(argv))
    except CoveyError as e:
        print(f"tool_agent: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.category.exit_code


if __name__ == "__main__":
    sys.exit(main())
