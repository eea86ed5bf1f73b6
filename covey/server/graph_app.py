"""`GraphServedApp`: any traced `App` as a `ServedApp`, its routes typed by its own variables.

The input model is built from the app's input variables' types (`question: str` becomes a
required string field; unknown fields are refused), the output model likewise from its
outputs, so request validation and the JSON schemas in `GET /apps/{name}` come from the
same place as the graph's own type checks. A type pydantic cannot describe is accepted as
any JSON value rather than refusing the app.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from covey.errors import ConfigError, EngineUnavailableError
from covey.graph.app import App
from covey.graph.ir import Var
from covey.runtime.events import Event
from covey.runtime.executor import Runtime


def _field_type(t: Any) -> Any:
    """`t` if pydantic can validate and describe it, else Any."""
    try:
        TypeAdapter(t).json_schema()
    except Exception:
        return Any
    return t


def _model_name(app: str, suffix: str) -> str:
    words = re.split(r"[^0-9a-zA-Z]+", app)
    return "".join(w[:1].upper() + w[1:] for w in words if w) + suffix


def model_for(
    app: str,
    variables: dict[str, Var],
    suffix: str,
    forbid_extra: bool,
    defaults: dict[str, Any] | None = None,
) -> type:
    """A pydantic model of an app's inputs or outputs; an input with a default in the app's
    wiring function is optional over REST too, as it is in Python."""
    defaults = defaults or {}
    fields: dict[str, Any] = {
        name: (_field_type(var.type), defaults.get(name, ...)) for name, var in variables.items()
    }
    config = ConfigDict(extra="forbid" if forbid_extra else "ignore", arbitrary_types_allowed=True)
    return create_model(_model_name(app, suffix), __config__=config, **fields)


def check_max_tokens(app: App, limit: int) -> None:
    """Refuse an app whose gens may ask for more output tokens than the server allows."""
    for node in app.plan.nodes.values():
        for prim in node.primitives:
            if prim.op == "decode" and prim.params is not None and not prim.choices:
                if prim.params.max_tokens > limit:
                    raise ConfigError(
                        f"app {app.name!r}, node {node.name!r}: gen {prim.var} asks for up to "
                        f"{prim.params.max_tokens} tokens, more than the server's max_tokens "
                        f"limit of {limit}; lower it in the app or raise the limit"
                    )


class GraphServedApp:
    """`runtime_getter` returns the runtime to run on at call time (the server builds its
    runtime once the engine is loaded, possibly after the apps are registered)."""

    def __init__(
        self,
        app: App,
        runtime_getter: Callable[[], Runtime | None],
        description: str | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigError(f"GraphServedApp needs an App, got {type(app).__name__}")
        if max_tokens is not None:
            check_max_tokens(app, max_tokens)
        self.app = app
        self.name = app.name
        self._runtime_getter = runtime_getter
        outputs = ", ".join(app.outputs)
        inputs = ", ".join(app.inputs) or "nothing"
        self.description = description or f"takes {inputs}; returns {outputs}"
        self.input_model: type[BaseModel] = model_for(
            app.name, app.inputs, "Inputs", True, app.defaults
        )
        self.output_model: type[BaseModel] = model_for(app.name, app.outputs, "Outputs", False)

    def stream(self, inputs: BaseModel) -> AsyncIterator[Event]:
        runtime = self._runtime_getter()
        if runtime is None:
            raise EngineUnavailableError("the server's engine is not loaded yet")
        values = {name: getattr(inputs, name) for name in self.app.inputs}
        return runtime.stream(self.app, **values)

    def describe(self) -> dict[str, Any]:
        """The plan as the server's runtime runs it: `explain()` ends with the features its
        engine turns off (a remote engine: no prefill ahead, no pins, no chunk reuse)."""
        runtime = self._runtime_getter()
        explain = runtime.explain(self.app) if runtime is not None else self.app.explain()
        return {"explain": explain, "mermaid": self.app.to_mermaid()}
