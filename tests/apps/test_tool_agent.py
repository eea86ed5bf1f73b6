"""The tool agent: its calculator, its registry of tools, a run on the embedded model with
the tiny docs index, and its command line."""

from __future__ import annotations

import asyncio
import runpy
import subprocess
import sys

import pytest

from covey.apps.tool_agent import TOOLS, build_tool_agent_app, calculator, evaluate
from covey.errors import ConfigError
from covey.runtime.tool_calls import BadCall, ToolCall, parse_call
from tests.cli.runner import covey_env


def test_calculator_does_arithmetic_and_nothing_else():
    assert evaluate("17 * 23") == "391"
    assert evaluate("(1 + 2) ** 3 / 9") == "3"
    assert evaluate("7 / 2") == "3.5"
    assert calculator.op.spec.check_return(evaluate("-4 % 3")) == "2"
    for bad in ("__import__('os')", "2 ** 100000", "x + 1", "10 ** 13", "1 +"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_only_registered_tools_are_offered_and_callable(tiny_index):
    with pytest.raises(ConfigError, match="no tool 'calculater' in the registry; did you mean"):
        build_tool_agent_app(tiny_index, tools=("calculater",))
    app = build_tool_agent_app(tiny_index, tools=("calculator",))
    box = app.plan.nodes["agent"].op.tools
    assert list(box.offered) == ["calculator"] and set(TOOLS) == {"calculator", "python_docs"}
    call = parse_call('{"name": "python_docs", "arguments": {"query": "for"}}', box)
    assert isinstance(call, BadCall) and "unknown tool 'python_docs'" in call.error
    docs = build_tool_agent_app(tiny_index).plan.nodes["agent"].op.tools.offered["python_docs"]
    found = asyncio.run(_call(docs, query="how does the with statement work"))
    assert "context manager" in found
    ok = parse_call('{"name": "calculator", "arguments": {"expression": "6*7"}}', box)
    assert isinstance(ok, ToolCall)


async def _call(spec, **kwargs):
    from covey.runtime.tool_pool import ToolPool

    pool = ToolPool()
    try:
        return await pool.call(spec, kwargs)
    finally:
        pool.close()


async def test_answers_on_the_embedded_model_and_frees_its_request(real_llm, tiny_index):
    from covey.runtime import Runtime

    app = build_tool_agent_app(tiny_index, max_tokens=24)
    runtime = Runtime(real_llm)
    result = await runtime.run_traced(app, question="What is 12 * 12?")
    assert isinstance(result.outputs["answer"], str) and result.outputs["answer"]
    node = result.trace.nodes["agent"]
    assert len({r.request_id for r in node.requests}) == 1
    assert len(node.tool_calls) <= 3
    stats = await real_llm.stats()
    assert stats.num_paused == 0 and stats.num_running == 0
    runtime.tools.close()


def test_runs_from_the_command_line(capsys, monkeypatch):
    done = subprocess.run(
        [sys.executable, "-m", "covey.apps.tool_agent", "What is 2 + 2?", "--max-tokens", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        env=covey_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    # A bad option fails before any model loads: the module run as __main__ in process (a
    # second child would spend its seconds on imports) exits 2 with a one-line error, and
    # neither AsyncLLM nor LLMEngine is built (both fail the test if they are).
    capsys.readouterr()
    loads = _forbid_model_loads(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["tool_agent", "q", "--max-tokens", "0"])
    monkeypatch.delitem(sys.modules, "covey.apps.tool_agent")  # run afresh, as `-m` does
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("covey.apps.tool_agent", run_name="__main__")
    assert loads == []
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tool_agent: error: ") and len(err.strip().splitlines()) == 1, err


def _forbid_model_loads(monkeypatch) -> list[str]:
    """Make building an AsyncLLM or an LLMEngine (what loads a model) record the attempt and
    raise an AssertionError; the list returned holds the attempts (an error the code under
    test swallowed still shows there)."""
    from covey.llm_backend import async_llm, llm_engine

    loads: list[str] = []

    def forbidden(name: str):
        def load(*args, **kwargs):
            loads.append(name)
            raise AssertionError(f"{name} built: a model loaded before the option check")

        return load

    monkeypatch.setattr(async_llm, "AsyncLLM", forbidden("AsyncLLM"))
    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", forbidden("LLMEngine"))
    return loads
