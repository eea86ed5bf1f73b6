"""Model-emitted tool calls: find one in a gen's text, check it, or say what was wrong.

The format is covey's default (`covey.graph.tools`): `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>`; the gen stops at the closing marker. A call is only run once it is
well formed, names a tool the semantic function offered, and its arguments validate
against that tool's pydantic model. Anything else becomes an error text that goes back to
the model as the call's result, so it can try again; nothing is executed for it. (The cap
on calls per run, `max_tool_calls`, is the tool loop's: past it, gens stop no more at a
call.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pydantic

from covey.graph.tools import CALL_OPEN, ToolBox, ToolSpec


@dataclass(frozen=True)
class ToolCall:
    """A checked call, ready to run."""

    spec: ToolSpec
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class BadCall:
    """A call that will not run, and the error text the model gets instead; `tool` is the
    name it gave, when it gave one."""

    error: str
    tool: str | None = None


def call_body(text: str) -> str | None:
    """The text after the last call marker in a gen's output, or None when it has none."""
    at = text.rfind(CALL_OPEN)
    return None if at < 0 else text[at + len(CALL_OPEN) :]


def _validation_text(e: pydantic.ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def parse_call(body: str, box: ToolBox) -> ToolCall | BadCall:
    """Check one call (the text between the markers) against the offered tools."""
    try:
        data = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return BadCall(
            f"error: the call is not valid JSON ({e.msg}); write "
            '{"name": ..., "arguments": {...}}'
        )
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return BadCall('error: the call must be a JSON object with a "name" string')
    name = data["name"]
    spec = box.offered.get(name)
    if spec is None:
        return BadCall(f"error: unknown tool {name!r}; tools: {', '.join(box.offered)}", name)
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models send the arguments JSON-encoded
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return BadCall(f"error: arguments of {name!r} must be a JSON object", name)
    try:
        kwargs = spec.validate_args(arguments)
    except pydantic.ValidationError as e:
        return BadCall(f"error: bad arguments for {name!r}: {_validation_text(e)}", name)
    return ToolCall(spec, kwargs)
