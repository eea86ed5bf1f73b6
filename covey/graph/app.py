"""`App`: trace a wiring function once into a validated graph and an optimized Plan.

Defining an app never runs a model: the function's parameters become input variables,
each DSL call inside it adds a node, and what it returns becomes the app's outputs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import networkx as nx

from covey.errors import AppInputError, GraphError, TypeMismatchError, WiringError
from covey.graph.call_inputs import RUN_OPTIONS, bind_inputs, check_input
from covey.graph.dsl import (
    NodeOutputs,
    function_name,
    signature_of,
    stop_tracing,
    tracing,
    tracing_app,
)
from covey.graph.export import to_dot, to_mermaid
from covey.graph.ir import Var
from covey.graph.passes import PASSES, Pass, run_passes
from covey.graph.plan import Plan, build_plan
from covey.graph.template import suggest
from covey.graph.types import compatible, type_name
from covey.graph.validate import validate_graph


def _outputs(app: str, result: Any) -> dict[str, Var]:
    if isinstance(result, Var):
        return {result.output or result.name: result}
    if isinstance(result, NodeOutputs):
        return {v.output or v.name: v for v in result}
    if isinstance(result, dict) and all(isinstance(v, Var) for v in result.values()):
        return {str(k): v for k, v in result.items()}
    raise GraphError(
        f"app {app!r}: must return a variable or a dict of name -> variable, "
        f"got {type(result).__name__}"
    )


def _check_defaults(app: str, inputs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A default is known at definition, so one that does not fit its input's type is a
    wiring mistake to report now, not an `AppInputError` blaming every caller who leaves
    the input out."""
    for name, default in defaults.items():
        try:
            check_input(app, name, inputs[name], default)
        except AppInputError:
            raise GraphError(
                f"app {app!r}: the default of input {name!r} is {default!r}, which is not a "
                f"{type_name(inputs[name])}; annotate it Optional[...] or change the default"
            ) from None


class App:
    """A traced, validated app with its default plan (every output awaited)."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        self.name = name or function_name(fn, "@app")
        function_name(fn, f"@app {self.name!r}")
        inputs, defaults, returns = signature_of(fn, f"app {self.name!r}", need_hints=False)
        for reserved in RUN_OPTIONS:
            if reserved in inputs:
                raise GraphError(
                    f"app {self.name!r}: input name {reserved!r} is reserved for the run "
                    "option of the same name; rename the input"
                )
        _check_defaults(self.name, inputs, defaults)
        builder, token = tracing(self.name)
        try:
            self.inputs = {n: Var(n, t, app=self.name) for n, t in inputs.items()}
            # used at call time for inputs the caller leaves out, as a Python function would
            self.defaults: dict[str, Any] = dict(defaults)
            result = fn(**self.inputs)
        finally:
            stop_tracing(token)
        self.outputs = _outputs(self.name, result)
        if len(self.outputs) == 1 and returns is not Any:
            (var,) = self.outputs.values()
            if not compatible(var.type, returns):
                raise TypeMismatchError(
                    f"app {self.name!r}: returns {var.name!r} of type {type_name(var.type)} "
                    f"but is annotated -> {type_name(returns)}; fix the annotation"
                )
        self.graph: nx.DiGraph = builder.graph
        self.graph.graph.update(inputs=self.inputs, outputs=self.outputs, defaults=self.defaults)
        validate_graph(self.graph)
        self.plan = self.optimize()

    def optimize(
        self, awaited: Iterable[str] | None = None, passes: tuple[Pass, ...] = PASSES
    ) -> Plan:
        """Run `passes` for a caller awaiting `awaited` outputs (default: all of them).

        Leaving a pass out keeps the naive choice it would have changed, for comparisons:
        without prefill_decomposition nothing is pinned, without objective_deduction every
        priority is 0, without prune_unused dead nodes run too.
        """
        names = tuple(awaited) if awaited is not None else tuple(self.outputs)
        for name in names:
            if name not in self.outputs:
                raise GraphError(
                    f"app {self.name!r}: no output {name!r}{suggest(name, list(self.outputs))} "
                    f"(outputs: {', '.join(self.outputs)})"
                )
        graph = self.graph.copy()
        graph.graph["awaited"] = names
        return build_plan(run_passes(graph, passes))

    def explain(self, awaited: Iterable[str] | None = None) -> str:
        """The optimized plan as text; `print(app.explain())`."""
        plan = self.plan if awaited is None else self.optimize(awaited)
        return plan.explain()

    def bind(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """The call's inputs by name, validated against their declared types: positional
        arguments fill the inputs in declared order, an input left out takes the wiring
        function's default. Raises `AppInputError`."""
        self._not_tracing()
        declared = {n: v.type for n, v in self.inputs.items()}
        return bind_inputs(self.name, declared, args, inputs, self.defaults)

    def __call__(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Run the app on the default runtime (see `covey.runtime.default_runtime`) and
        block until its outputs are ready: `app("text")` or `app(text="text")`."""
        values = self.bind(*args, **inputs)
        return self._runtime().run(self, **values)

    async def acall(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Like calling the app, awaited from any event loop."""
        values = self.bind(*args, **inputs)
        return await self._runtime().arun(self, **values)

    def run_traced(self, *args: Any, record_prompts: bool = False, **inputs: Any) -> Any:
        """Like calling the app, returning a `RunResult` with the outputs and the run's
        `Trace`; `record_prompts=True` records each LLM request's exact prompt in it."""
        values = self.bind(*args, **inputs)
        return self._runtime().run_traced(self, record_prompts=record_prompts, **values)

    def stream(
        self, *args: Any, record_prompts: bool = False, **inputs: Any
    ) -> AsyncIterator[Any]:
        """Node start/finish events and token deltas of output variables, then RunFinished;
        with `record_prompts=True` also a `PromptRendered` event before each LLM request.
        Leaving the loop early cancels the run and frees its KV."""
        values = self.bind(*args, **inputs)
        return self._runtime().stream(self, record_prompts=record_prompts, **values)

    def _runtime(self) -> Any:
        self._not_tracing()
        from covey.runtime.background import default_runtime

        return default_runtime()

    def _not_tracing(self) -> None:
        if tracing_app() is not None:
            raise WiringError(
                f"app {self.name!r} was called while defining app {tracing_app()!r}: apps do "
                "not nest; call its semantic functions and nodes there instead"
            )

    def to_mermaid(self) -> str:
        return to_mermaid(self.plan.graph)

    def to_dot(self) -> str:
        return to_dot(self.plan.graph)

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}: {type_name(v.type)}" for n, v in self.inputs.items())
        return f"App({self.name}({ins}) -> {', '.join(self.outputs)})"


def app(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """`@app` or `@app(name=...)`: trace `fn` now into an `App`."""
    if fn is None:
        return lambda f: App(f, name)
    return App(fn, name)
