"""Give a semantic function its tools: check its `{{call ...}}` tags, tell the model how to
call the offered ones.

Checked when the function is defined, so a typo in a tool or argument name is a clear
error then, not a failed run: each `{{call}}` names a tool in `calls=[...]`, comes after a
gen (it runs between generations on one context), and fills every required parameter from
an input or an earlier gen output. Offered tools (`tools=[...]`) get their instructions
(`ToolBox.instructions`) as static text at the end of the system message (or the start of
a plain prompt), so the text is part of the plan, pinned like any static prefix.
"""

from __future__ import annotations

from typing import Any

from covey.checks import as_int
from covey.errors import GraphError, TemplateError
from covey.graph.template import Call, Gen, Ref, Template, Text, suggest
from covey.graph.tools import DEFAULT_MAX_TOOL_CALLS, ToolBox, ToolSpec


def tool_specs(tools: Any, what: str, where: str) -> dict[str, ToolSpec]:
    """Name -> spec from a list of `@tool` functions; a GraphError for anything else."""
    if tools is None:
        return {}
    if not isinstance(tools, list | tuple):
        raise GraphError(f"{where}: {what}= takes a list of @tool functions, got {tools!r}")
    specs: dict[str, ToolSpec] = {}
    for t in tools:
        spec = getattr(getattr(t, "op", None), "spec", None)
        if not isinstance(spec, ToolSpec):
            raise GraphError(f"{where}: {what}= takes @tool functions; {t!r} is not one")
        if spec.name in specs and specs[spec.name] is not spec:
            raise GraphError(f"{where}: two tools are named {spec.name!r} in {what}=")
        specs[spec.name] = spec
    return specs


def call_refs(template: Template) -> set[str]:
    """Names the template's `{{call}}` tags read (inputs or earlier outputs)."""
    return {ref for call in template.calls for _, ref in call.args}


def bind_call(call: Call, spec: ToolSpec, where: str) -> dict[str, str]:
    """Tool parameter -> the name that fills it."""
    params = list(spec.inputs)
    if len(call.args) == 1 and call.args[0][0] is None:
        if len(params) != 1:
            raise TemplateError(
                f"{where}: {{{{call {call.tool}}}}}: the tool takes {params}; name each one "
                "(param=name)"
            )
        return {params[0]: call.args[0][1]}
    bound: dict[str, str] = {}
    for param, ref in call.args:
        if param not in spec.inputs:
            raise TemplateError(
                f"{where}: {{{{call {call.tool}}}}}: the tool has no parameter {param!r}"
                f"{suggest(param or '', params)} (parameters: {params})"
            )
        bound[param] = ref
    missing = [p for p in params if p not in bound and p not in spec.defaults]
    if missing:
        raise TemplateError(f"{where}: {{{{call {call.tool}}}}}: missing argument(s) {missing}")
    return bound


def _check_calls(
    template: Template, inputs: dict[str, Any], called: dict[str, ToolSpec], where: str
) -> None:
    outputs: set[str] = set()
    for part in template.parts:
        if isinstance(part, Gen):
            outputs.add(part.name)
        if not isinstance(part, Call):
            continue
        if part.tool not in called:
            raise TemplateError(
                f"{where}: {{{{call {part.tool}}}}} names no tool in calls=[...]"
                f"{suggest(part.tool, list(called))} (calls: {list(called) or 'none'})"
            )
        if not outputs:
            raise TemplateError(
                f"{where}: {{{{call {part.tool}}}}} comes before any gen; a call runs between "
                "generations (call a tool on inputs alone as a @tool node in the app)"
            )
        for ref in bind_call(part, called[part.tool], where).values():
            if ref not in inputs and ref not in outputs:
                names = [*inputs, *outputs]
                raise TemplateError(
                    f"{where}: {{{{call {part.tool}}}}} reads {ref!r}, which is neither an input "
                    f"nor an earlier output{suggest(ref, names)}"
                )


def _with_instructions(template: Template, text: str) -> Template:
    parts = list(template.parts)
    if not template.uses_roles:
        return Template((Text(text + "\n\n"), *parts), False)
    if parts and parts[0].role == "system":
        end = next((i for i, p in enumerate(parts) if p.role != "system"), len(parts))
        lead = "\n\n" if any(isinstance(p, Text | Ref) for p in parts[:end]) else ""
        parts.insert(end, Text(lead + text, "system"))
    else:
        parts.insert(0, Text(text, "system"))
    return Template(tuple(parts), True)


def attach_tools(
    template: Template,
    inputs: dict[str, Any],
    tools: Any,
    calls: Any,
    max_tool_calls: Any,
    where: str,
) -> tuple[Template, ToolBox | None]:
    """The template the function sends (with tool instructions) and its `ToolBox` (None
    when it uses no tools)."""
    offered = tool_specs(tools, "tools", where)
    called = tool_specs(calls, "calls", where)
    limit = as_int(f"{where}: max_tool_calls", max_tool_calls, ge=0, error=GraphError)
    _check_calls(template, inputs, called, where)
    if not offered and not called:
        if max_tool_calls != DEFAULT_MAX_TOOL_CALLS:
            raise GraphError(f"{where}: max_tool_calls without tools=[...]")
        return template, None
    box = ToolBox(offered, called, limit)
    if offered:
        template = _with_instructions(template, box.instructions())
    return template, box
