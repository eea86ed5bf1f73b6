"""The DSL: free functions and decorators that add IR nodes while an `@app` is traced.

Calling a semantic function, tool or function inside an app function adds a node and
returns its output variables; nothing runs. Outside an app the call is an error.
"""

from __future__ import annotations

import inspect
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import networkx as nx

from covey.errors import (
    GraphError,
    InvalidRequestError,
    TemplateError,
    TypeMismatchError,
    UnboundPlaceholderError,
    WiringError,
)
from covey.graph.ir import (
    Arg,
    Const,
    LLMCall,
    MapOp,
    Op,
    PyCall,
    Retrieve,
    Var,
    add_node,
    new_graph,
    output_var,
)
from covey.graph.template import Ref, Template, parse_template, suggest
from covey.graph.tool_use import attach_tools, call_refs
from covey.graph.tools import DEFAULT_MAX_TOOL_CALLS, ToolSpec, make_spec
from covey.graph.types import compatible, item_type, type_name, value_fits
from covey.llm_backend.sampling_params import SamplingParams
from covey.retrieval.searcher import MODES, check_k, check_mode


class Builder:
    """The graph of the app being traced, and the names given out so far."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.graph: nx.DiGraph = new_graph(app)
        self._names: Counter[str] = Counter()
        # Inside a cg.route branch or a cg.loop iteration (covey.graph.control_flow): the
        # conditions every node added now runs under, and the suffix of its name (`@2`).
        self.guard: tuple[Any, ...] = ()
        self.suffix = ""

    def add(self, base: str, op: Op, args: dict[str, Arg]) -> dict[str, Var]:
        base += self.suffix
        node = base
        while node in self.graph:  # a second call of the same function gets a suffix
            self._names[base] += 1
            node = f"{base}_{self._names[base] + 1}"
        add_node(self.graph, node, op, args)
        if self.guard:
            self.graph.nodes[node]["guard"] = self.guard
        return {name: output_var(self.graph, node, name) for name in op.outputs}


_CURRENT: ContextVar[Builder | None] = ContextVar("covey_graph_builder", default=None)


def current_builder(what: str) -> Builder:
    builder = _CURRENT.get()
    if builder is None:
        raise WiringError(
            f"{what} was called outside an app: call it inside a function decorated with "
            "@covey.graph.app (calling builds the graph; the runtime runs it)"
        )
    return builder


class UnknownOutputError(WiringError, AttributeError):
    """A node has no output by that name. Also an AttributeError, so `hasattr(out, name)`
    and `getattr(out, name, default)` keep working on node outputs."""


class NodeOutputs:
    """The outputs of a multi-output node: `out.answer`, `out["answer"]` or unpacking."""

    def __init__(self, outputs: dict[str, Var]) -> None:
        self._outputs = outputs

    def __getattr__(self, name: str) -> Var:
        try:
            return self._outputs[name]
        except KeyError:
            names = list(self._outputs)
            raise UnknownOutputError(
                f"no output {name!r}{suggest(name, names)} (outputs: {names})"
            ) from None

    def __getitem__(self, name: str) -> Var:
        return self.__getattr__(name)

    def __iter__(self) -> Iterator[Var]:
        return iter(self._outputs.values())


def function_name(fn: Any, what: str) -> str:
    """The name of the function a decorator was given; a GraphError for anything else."""
    name = getattr(fn, "__name__", None)
    if not callable(fn) or not isinstance(name, str):
        raise GraphError(f"{what} decorates a function (def ...), got {fn!r}")
    return name


def signature_of(fn: Callable[..., Any], what: str, need_hints: bool) -> tuple[dict, dict, Any]:
    """Inputs (name -> type), defaults and return type, from the type hints."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise GraphError(f"{what}: cannot resolve its type hints ({e})") from None
    inputs, defaults = {}, {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise GraphError(f"{what}: *{p.name} is not supported; name each input")
        if p.name not in hints and need_hints:
            raise GraphError(
                f"{what}: parameter {p.name!r} has no type hint; annotate it "
                "(use typing.Any to accept anything)"
            )
        inputs[p.name] = hints.get(p.name, Any)
        if p.default is not p.empty:
            defaults[p.name] = p.default
    if need_hints and "return" not in hints:
        raise GraphError(f"{what}: add a return type hint; it types the node's output")
    return inputs, defaults, hints.get("return", Any)


def _listing(inputs: dict[str, Any]) -> str:
    return ", ".join(f"{n}: {type_name(t)}" for n, t in inputs.items()) or "none"


def _bind_one(where: str, port: str, want: Any, value: Any, app: str) -> Arg:
    if isinstance(value, NodeOutputs):
        raise WiringError(f"{where}: input {port!r} got several outputs; pick one, e.g. out.answer")
    if isinstance(value, Var):
        if value.app != app:
            raise WiringError(
                f"{where}: input {port!r} got variable {value.name!r} of app {value.app!r}; "
                "variables cannot cross apps"
            )
        if not compatible(value.type, want):
            raise TypeMismatchError(
                f"{where}: input {port!r} expects {type_name(want)} but variable {value.name!r} "
                f"is {type_name(value.type)}; convert it with a @covey.graph.function node "
                f"or change the type hint of {port!r}"
            )
        return value
    if not value_fits(value, want):
        raise TypeMismatchError(
            f"{where}: input {port!r} expects {type_name(want)} but got the literal "
            f"{value!r} ({type(value).__name__})"
        )
    return Const(value)


def bind(
    where: str, inputs: dict[str, Any], defaults: dict, args: tuple, kwargs: dict, app: str
) -> dict[str, Arg]:
    """Match call arguments to declared inputs, type-checking each one."""
    names = list(inputs)
    if len(args) > len(names):
        raise WiringError(
            f"{where}: takes {len(names)} inputs ({_listing(inputs)}), got {len(args)}"
        )
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in inputs:
            raise WiringError(
                f"{where}: no input {key!r}{suggest(key, names)} (inputs: {_listing(inputs)})"
            )
        if key in given:
            raise WiringError(f"{where}: input {key!r} given twice")
        given[key] = value
    missing = [n for n in names if n not in given and n not in defaults]
    if missing:
        raise WiringError(
            f"{where}: missing input(s) {', '.join(repr(m) for m in missing)}; pass them, e.g. "
            f"{missing[0]}=<{type_name(inputs[missing[0]])}> (inputs: {_listing(inputs)})"
        )
    return {
        n: _bind_one(where, n, inputs[n], given[n] if n in given else defaults[n], app)
        for n in names
    }


class Node:
    """A callable that adds one node per call while an app is traced."""

    name: str
    op: LLMCall | PyCall
    defaults: dict[str, Any]
    label: str

    def __call__(self, *args: Any, **kwargs: Any) -> Var | NodeOutputs:
        builder = current_builder(f"{self.label} {self.name!r}")
        where = f"app {builder.app!r}, node {self.name!r}"
        bound = bind(where, self.op.inputs, self.defaults, args, kwargs, builder.app)
        return _result(builder.add(self.name, self.op, bound))


def _result(outputs: dict[str, Var]) -> Var | NodeOutputs:
    return next(iter(outputs.values())) if len(outputs) == 1 else NodeOutputs(outputs)


class SemanticFunction(Node):
    """A prompt template with typed inputs and generated outputs; see template.py."""

    label = "semantic function"

    def __init__(self, fn: Callable[..., Any], params: SamplingParams, **tools: Any) -> None:
        self.name = function_name(fn, "@semantic_function")
        where = f"semantic function {self.name!r}"
        if not (fn.__doc__ or "").strip():
            raise TemplateError(f"{where}: the docstring is the template and it is empty")
        inputs, self.defaults, _ = signature_of(fn, where, need_hints=False)
        template = parse_template(inspect.cleandoc(fn.__doc__ or ""), where, params)
        _check_names(template, inputs, where)
        template, box = attach_tools(template, inputs, where=where, **tools)
        self.op = LLMCall(template, inputs, tools=box)


def _check_names(template: Template, inputs: dict[str, Any], where: str) -> None:
    names = list(inputs)
    for part in template.parts:
        if isinstance(part, Ref) and part.name not in inputs:
            raise UnboundPlaceholderError(
                f"{where}: placeholder {{{{{part.name}}}}} is not a parameter"
                f"{suggest(part.name, names)} (parameters: {_listing(inputs)}); "
                "fix the spelling or add the parameter"
            )
    for gen in template.gens:
        if gen.name in inputs:
            raise TemplateError(f"{where}: output {gen.name!r} is also a parameter; rename one")
    for name in names:
        if name not in template.refs and name not in call_refs(template):
            raise TemplateError(
                f"{where}: parameter {name!r} is never used; add {{{{{name}}}}} to the template "
                "or remove the parameter"
            )


def semantic_function(
    fn: Callable[..., Any] | None = None,
    *,
    params: SamplingParams | None = None,
    tools: list[Any] | None = None,
    calls: list[Any] | None = None,
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS,
) -> Any:
    """`@semantic_function` or `@semantic_function(params=...)`: defaults for every gen.

    `tools=[...]`: @tool functions the model may call from its gens (at most
    `max_tool_calls` per run); `calls=[...]`: tools the template calls with `{{call ...}}`
    between two gens. See covey/graph/tool_use.py.
    """
    if params is not None and not isinstance(params, SamplingParams):
        raise GraphError(
            f"@semantic_function(params=...) takes a SamplingParams, got {params!r}"
        )
    defaults = params or SamplingParams()
    options = {"tools": tools, "calls": calls, "max_tool_calls": max_tool_calls}
    if fn is None:
        return lambda f: SemanticFunction(f, defaults, **options)
    return SemanticFunction(fn, defaults, **options)


class PyFunction(Node):
    def __init__(self, fn: Callable[..., Any], kind: str, spec: ToolSpec | None = None) -> None:
        self.name, self.label = function_name(fn, f"@{kind}"), kind
        inputs, self.defaults, returns = signature_of(fn, f"{kind} {self.name!r}", need_hints=True)
        self.op = PyCall(fn, inputs, returns, kind, spec)  # type: ignore[arg-type]


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    timeout: float | None = None,
    executor: str = "thread",
    description: str | None = None,
) -> Any:
    """`@tool` or `@tool(timeout=..., executor="thread"|"process", description=...)`: a typed
    callable an app calls as a node, a template calls between gens, or a model calls.

    It runs in the runtime's tool pool, apart from @function nodes, under `timeout` seconds
    (default: the pool's); its return value is checked against its annotation."""

    def make(f: Callable[..., Any]) -> PyFunction:
        return PyFunction(f, "tool", make_spec(f, timeout, executor, description))

    return make if fn is None else make(fn)


def function(fn: Callable[..., Any]) -> PyFunction:
    """A cheap, pure Python step over variables (formatting, parsing, joining)."""
    return PyFunction(fn, "function")


def retrieve(
    query: Var | str, k: int | None = None, index: str = "default", mode: str | None = None
) -> Var:
    """Search the searcher the runtime binds to `index`; returns a `list[SearchResult]` var.

    `k` (how many results) and `mode` (vector, bm25 or hybrid) left as None mean that
    searcher's own settings, so a node never silently replaces a retriever's: a
    `Retriever` uses its `RetrieverConfig.k` and `.mode`, a bare `DocumentIndex` its
    defaults, `covey.retrieval.searcher.DEFAULT_K` (5 results) and `DEFAULT_MODE`
    ("hybrid"); a `RetrieverConfig()` left at its defaults uses the same two. A value given
    overrides them for this node only, and `explain()` says so. They are checked here, when
    the app is defined, by the same `check_k`/`check_mode` every searcher uses.
    """
    builder = current_builder("retrieve")
    where = f"app {builder.app!r}, retrieve"
    try:
        k = None if k is None else check_k(k)
    except InvalidRequestError as e:
        raise WiringError(f"{where}: {e}") from None
    try:
        mode = None if mode is None else check_mode(mode)
    except InvalidRequestError as e:
        raise WiringError(f"{where}: {e}{suggest(mode, MODES)}") from None
    if not isinstance(index, str) or not index:
        raise WiringError(f"{where}: index must be a non-empty name, got {index!r}")
    op = Retrieve(index, k, mode)
    bound = bind(where, op.inputs, {}, (query,), {}, builder.app)
    return builder.add("retrieve", op, bound)["results"]


def map(fn: Node, over: Var, item: str | None = None, **kwargs: Any) -> Var | NodeOutputs:
    """Fan out: run `fn` once per element of the list `over`, bound to input `item`.

    The other inputs come from `kwargs`; each output becomes a list in element order.
    Any node that takes that list is the reduce.
    """
    builder = current_builder("map")
    if not isinstance(fn, Node):
        raise WiringError(
            f"app {builder.app!r}, map: fans out a @semantic_function, @tool or @function, "
            f"got {fn!r}; decorate it first"
        )
    where = f"app {builder.app!r}, node 'map_{fn.name}'"
    inputs = fn.op.inputs
    free = [n for n in inputs if n not in kwargs and n not in fn.defaults]
    if item is None:
        if len(free) != 1:
            raise WiringError(f"{where}: say which input gets each element: item=<one of {free}>")
        item = free[0]
    if item not in inputs:
        raise WiringError(f"{where}: no input {item!r}{suggest(item, list(inputs))}")
    elem = item_type(over.type) if isinstance(over, Var) else None
    if elem is None:
        got = type_name(over.type) if isinstance(over, Var) else repr(over)
        raise TypeMismatchError(f"{where}: map needs a list variable to fan out over, got {got}")
    others = {n: t for n, t in inputs.items() if n != item}
    bound = bind(where, others, fn.defaults, (), kwargs, builder.app)
    op = MapOp(fn.op, item)
    bound[item] = _bind_one(where, item, list[inputs[item]], over, builder.app)
    return _result(builder.add(f"map_{fn.name}", op, bound))


def tracing(app: str) -> tuple[Builder, Any]:
    """Start tracing an app; returns the builder and the token to reset."""
    builder = Builder(app)
    return builder, _CURRENT.set(builder)


def stop_tracing(token: Any) -> None:
    _CURRENT.reset(token)


def tracing_app() -> str | None:
    """The name of the app being defined right now, if any."""
    builder = _CURRENT.get()
    return builder.app if builder is not None else None
