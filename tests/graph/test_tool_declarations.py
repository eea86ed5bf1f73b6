"""Tool declarations: options, argument and return checks, and `{{call}}` / `tools=` wiring,
all checked when the app is defined."""

from __future__ import annotations

import pydantic
import pytest

import covey.graph as cg
from covey.errors import GraphError, TemplateError
from covey.graph.tools import CALL_CLOSE, CALL_OPEN, ToolReturnError


@cg.tool(timeout=2.5, description="Evaluate arithmetic.")
def calculator(expression: str) -> str:
    return expression


@cg.tool
def lookup(query: str, k: int = 3) -> list[str]:
    """Search the notes.

    Longer text that is not the description."""
    return [query] * k


def test_tool_options_and_schema():
    spec = calculator.op.spec
    assert (spec.name, spec.timeout_s, spec.executor) == ("calculator", 2.5, "thread")
    assert spec.description == "Evaluate arithmetic."
    assert lookup.op.spec.description == "Search the notes."
    assert lookup.op.spec.timeout_s is None  # the pool's default
    assert lookup.op.spec.schema() == {
        "type": "object",
        "properties": {"query": {"type": "string"}, "k": {"type": "integer", "default": 3}},
        "required": ["query"],
    }


def test_bad_tool_options_are_clear_errors():
    def f(x: str) -> str:
        return x

    with pytest.raises(GraphError, match="executor must be one of thread, process"):
        cg.tool(executor="fork")(f)
    with pytest.raises(GraphError, match="timeout must be"):
        cg.tool(timeout=0)(f)
    with pytest.raises(GraphError, match="module-level function"):
        cg.tool(executor="process")(f)
    with pytest.raises(GraphError, match="has no type hint"):
        cg.tool(lambda x: x)


def test_arguments_validate_against_the_signature():
    spec = lookup.op.spec
    assert spec.validate_args({"query": "sort", "k": 2}) == {"query": "sort", "k": 2}
    assert spec.validate_args({"query": "sort"}) == {"query": "sort", "k": 3}
    for bad in ({"k": 2}, {"query": "a", "k": "many"}, {"query": "a", "extra": 1}):
        with pytest.raises(pydantic.ValidationError):
            spec.validate_args(bad)


def test_return_value_is_checked_against_the_annotation():
    spec = calculator.op.spec
    assert spec.check_return("4") == "4"
    with pytest.raises(ToolReturnError, match=r"tool 'calculator' returned None .* -> str"):
        spec.check_return(None)
    with pytest.raises(ToolReturnError, match="tool 'lookup'"):
        lookup.op.spec.check_return(["a", 3])


def test_call_between_gens_lowers_to_a_call_primitive():
    @cg.semantic_function(calls=[calculator])
    def calc(question: str):
        """Q: {{question}}
        Expression: {{gen expr max_tokens=8 stop="\\n"}}
        Result: {{call calculator expr}}
        Answer: {{gen answer max_tokens=8}}"""

    @cg.app
    def app(question: str):
        return calc(question)

    ops = [p.op for p in app.plan.nodes["calc"].primitives]
    assert ops == [*["prefill"] * 3, "decode", "prefill", "call", "prefill", "decode"]
    call = app.plan.nodes["calc"].primitives[5]
    assert (call.tool, call.args) == ("calculator", (("expression", "expr"),))
    assert "call(calculator: expression=expr)" in app.explain()


def test_bad_calls_fail_when_the_function_is_defined():
    def define(doc: str, **kw):
        def f(question: str):
            pass

        f.__doc__ = doc
        return cg.semantic_function(**kw)(f)

    with pytest.raises(TemplateError, match=r"names no tool in calls=\[...\]; did you mean"):
        define("{{question}} {{gen a}} {{call calculater a}} {{gen b}}", calls=[calculator])
    with pytest.raises(TemplateError, match="comes before any gen"):
        define("{{call calculator question}} {{gen a}}", calls=[calculator])
    with pytest.raises(TemplateError, match="neither an input nor an earlier output"):
        define("{{question}} {{gen a}} {{call calculator b}} {{gen b}}", calls=[calculator])
    with pytest.raises(TemplateError, match="no parameter 'expr'"):
        define("{{question}} {{gen a}} {{call calculator expr=a}}", calls=[calculator])
    with pytest.raises(TemplateError, match=r"missing argument\(s\) \['query'\]"):
        define("{{question}} {{gen a}} {{call lookup k=a}}", calls=[lookup])
    with pytest.raises(GraphError, match="takes @tool functions"):
        define("{{question}} {{gen a}}", tools=[len])
    with pytest.raises(GraphError, match="max_tool_calls without tools"):
        define("{{question}} {{gen a}}", max_tool_calls=2)


def test_offered_tools_are_explained_in_the_system_message():
    @cg.semantic_function(tools=[calculator, lookup], max_tool_calls=2)
    def agent(question: str):
        """{{#system}}Be brief.{{#user}}{{question}}{{#assistant}}{{gen answer}}"""

    first = agent.op.template.parts[0]
    assert first.role == "system"
    system = "".join(p.text for p in agent.op.template.parts if p.role == "system")
    assert system.startswith("Be brief.\n\nYou can call these tools:")
    assert "- calculator: Evaluate arithmetic." in system
    assert "- lookup: Search the notes." in system
    assert CALL_OPEN in system and CALL_CLOSE in system
    assert agent.op.tools.max_tool_calls == 2 and list(agent.op.tools.offered) == [
        "calculator",
        "lookup",
    ]
