"""Tool declarations: a typed Python function an app or a model may call.

`@tool` (or `@tool(timeout=..., executor=..., description=...)`) reads the function's
type hints once, when it is decorated, into a `ToolSpec`: a pydantic model of its
arguments (what a model-emitted call is validated against before anything runs) and a
pydantic adapter for its return type (what every result is checked against, so a `-> str`
tool that returns None is an error naming the tool, not the text "None" in a prompt).
The runtime runs tools in a pool of their own with a timeout each (`ToolPool`); the spec
only says how: `executor="thread"` for I/O-bound tools, `"process"` for CPU-bound or
untrusted ones (a process can be killed when it hangs; a thread cannot).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic

from covey.checks import as_real
from covey.errors import GraphError, RuntimeExecutionError

Executor = Literal["thread", "process"]
EXECUTORS: tuple[str, ...] = ("thread", "process")
DEFAULT_TOOL_TIMEOUT_S = 30.0


class ToolReturnError(RuntimeExecutionError):
    """A tool returned a value that does not fit its return annotation (a bug in the tool)."""


@dataclass(frozen=True, eq=False)
class ToolSpec:
    """One tool: its function, typed inputs and output, and how the runtime runs it.

    `timeout_s` None means the runtime's default (`DEFAULT_TOOL_TIMEOUT_S` unless the
    `ToolPool` was given another)."""

    name: str
    fn: Callable[..., Any]
    inputs: dict[str, Any]
    defaults: dict[str, Any]
    returns: Any
    timeout_s: float | None = None
    executor: Executor = "thread"
    description: str = ""
    args_model: type[pydantic.BaseModel] = field(init=False, repr=False)
    return_adapter: pydantic.TypeAdapter | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        fields = {
            n: (t, self.defaults[n] if n in self.defaults else ...) for n, t in self.inputs.items()
        }
        config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
        model = pydantic.create_model(f"{self.name}_args", __config__=config, **fields)
        object.__setattr__(self, "args_model", model)
        adapter = None if self.returns is Any else pydantic.TypeAdapter(self.returns)
        object.__setattr__(self, "return_adapter", adapter)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def validate_args(self, arguments: Any) -> dict[str, Any]:
        """The call's arguments as the function takes them; pydantic.ValidationError if they
        do not fit (a model's call then gets the error text back, and nothing runs)."""
        parsed = self.args_model.model_validate(arguments)
        return {n: getattr(parsed, n) for n in self.inputs}

    def check_return(self, value: Any) -> Any:
        """`value` if it fits the return annotation (strictly: no None for str, no "3" for
        int), else a ToolReturnError naming the tool and what it returned."""
        if self.return_adapter is None:
            return value
        try:
            return self.return_adapter.validate_python(value, strict=True)
        except pydantic.ValidationError as e:
            first = e.errors()[0]["msg"] if e.errors() else str(e)
            raise ToolReturnError(
                f"tool {self.name!r} returned {_short(value)} ({type(value).__name__}) but is "
                f"annotated -> {_type_text(self.returns)}: {first}"
            ) from None

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments, as shown to a model."""
        schema = self.args_model.model_json_schema()
        props = {
            n: {k: v for k, v in p.items() if k != "title"}
            for n, p in schema.get("properties", {}).items()
        }
        return {"type": "object", "properties": props, "required": schema.get("required", [])}

    def describe(self) -> str:
        """One line for a prompt: name, what it does, its arguments as JSON schema."""
        what = f": {self.description}" if self.description else ""
        return f"- {self.name}{what}\n  arguments: {json.dumps(self.schema())}"


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _type_text(t: Any) -> str:
    from covey.graph.types import type_name

    return type_name(t)


def make_spec(
    fn: Callable[..., Any],
    timeout: float | None = None,
    executor: str = "thread",
    description: str | None = None,
) -> ToolSpec:
    """A `ToolSpec` from a decorated function; a GraphError for a bad option."""
    from covey.graph.dsl import function_name, signature_of

    name = function_name(fn, "@tool")
    where = f"tool {name!r}"
    inputs, defaults, returns = signature_of(fn, where, need_hints=True)
    if timeout is not None:
        timeout = as_real(f"{where}: timeout", timeout, gt=0, error=GraphError)
    if executor not in EXECUTORS:
        raise GraphError(
            f"{where}: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}"
        )
    if executor == "process" and inspect.iscoroutinefunction(fn):
        raise GraphError(f"{where}: an async tool runs on the event loop, not in a process")
    if executor == "process" and "<locals>" in getattr(fn, "__qualname__", ""):
        raise GraphError(
            f"{where}: a process tool must be a module-level function (it is pickled by "
            "name into the worker process)"
        )
    if description is None:
        description = " ".join(inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].split())
    try:
        return ToolSpec(name, fn, inputs, defaults, returns, timeout, executor, description)  # type: ignore[arg-type]
    except (pydantic.PydanticSchemaGenerationError, TypeError) as e:
        raise GraphError(f"{where}: its type hints cannot be validated ({e})") from None


# The call format. SmolLM2's chat template (the embedded model) has no tool format, so
# covey's default is this one, explained to the model in its prompt (`instructions`): a
# call is one JSON object between the markers, the result comes back between the result
# markers, and generation goes on after it on the same context.
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESULT_OPEN = "<tool_result>"
RESULT_CLOSE = "</tool_result>"
DEFAULT_MAX_TOOL_CALLS = 4


@dataclass(frozen=True, eq=False)
class ToolBox:
    """The tools of one semantic function.

    `offered`: tools the model may call itself (`tools=[...]`): their gens stop at
    `CALL_CLOSE`, the call is parsed and validated, run, and its result appended.
    `called`: tools the template calls at `{{call ...}}` (`calls=[...]`).
    `max_tool_calls`: model-emitted calls allowed per request (per gen of one run); past
    it the model is told so and no more calls run.
    """

    offered: dict[str, ToolSpec]
    called: dict[str, ToolSpec]
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS

    def instructions(self) -> str:
        """The text that tells the model how to call the offered tools."""
        listing = "\n".join(spec.describe() for spec in self.offered.values())
        return (
            "You can call these tools:\n"
            f"{listing}\n"
            f"To call one, write {CALL_OPEN}" + '{"name": "<tool>", "arguments": {...}}'
            + f"{CALL_CLOSE} and stop. The result comes back as "
            f"{RESULT_OPEN}...{RESULT_CLOSE}; then continue your answer."
        )


def result_text(text: str) -> str:
    """How a tool's result (or error) is appended after its call."""
    return f"\n{RESULT_OPEN}{text}{RESULT_CLOSE}\n"
