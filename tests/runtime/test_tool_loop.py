"""Tool calls inside an LLM node, on the embedded model: `{{call}}` between two gens on one
paused-and-resumed request, model-emitted calls (checked, capped, never run when invalid),
failing tools, and cancellation while paused."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import covey.graph as cg
from covey.graph.tools import CALL_CLOSE
from covey.llm_backend.engine_client import EngineCapabilities
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import Runtime
from covey.runtime.tool_calls import BadCall, ToolCall, parse_call

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
RUNS: list[str] = []
GATE: asyncio.Event | None = None


@cg.tool(timeout=5)
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    RUNS.append(expression)
    return str(eval(expression, {"__builtins__": {}}))


@cg.tool
def broken(expression: str) -> str:
    raise RuntimeError("the calculator is on fire")


@cg.tool(timeout=0.2)
def stuck(expression: str) -> str:
    time.sleep(5)
    return "late"


@cg.tool(timeout=60)
async def waits(expression: str) -> str:
    assert GATE is not None
    await GATE.wait()
    return "done"




def _calc_app(tool) -> cg.App:
    def calc(question: str):
        pass

    calc.__doc__ = (
        'Question: {{question}}\nExpression: {{gen expr max_tokens=12 stop="\\n"}}\n'
        f"Result: {{{{call {tool.name} expr}}}}\n"
        'Answer: {{gen answer max_tokens=8 stop="\\n"}}'
    )
    fn = cg.semantic_function(params=GREEDY, calls=[tool])(calc)

    @cg.app(name=f"calc_{tool.name}")
    def app(question: str):
        return fn(question)

    return app


class NoPause:
    """The same engine with its pause capability turned off: every turn a fresh request
    (what a remote engine gets)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def capabilities(self) -> EngineCapabilities:
        return replace(self._inner.capabilities, pause=False)

    @property
    def model_name(self):
        return self._inner.model_name

    @property
    def tokenizer(self):
        return self._inner.tokenizer

    def generate(self, *args, **kwargs):
        return self._inner.generate(*args, **kwargs)


async def _settled(llm, used: int) -> None:
    for _ in range(200):
        stats = await llm.stats()
        if stats.num_paused == 0 and stats.num_running == 0 and stats.kv_blocks_used == used:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not settle: {await llm.stats()}")


async def test_call_between_gens_runs_on_one_paused_request(real_llm):
    app = _calc_app(calculator)
    RUNS.clear()
    base = (await real_llm.stats()).kv_blocks_used
    one = await Runtime(real_llm).run_traced(app, question="What is 17 * 23?")
    node = one.trace.nodes["calc"]
    assert [r.finish_reason for r in node.requests] == ["paused", "stop"]
    assert len({r.request_id for r in node.requests}) == 1  # one request, two turns
    assert node.requests[1].prompt_tokens > node.requests[0].prompt_tokens  # same context
    (call,) = node.tool_calls
    assert (call.tool, call.by, call.error) == ("calculator", "template", None)
    assert call.arguments == {"expression": one.outputs["expr"]} and RUNS == [one.outputs["expr"]]
    await _settled(real_llm, base)
    # the same node over fresh requests (an engine without pause) answers the same, greedily
    fresh = await Runtime(NoPause(real_llm)).run_traced(app, question="What is 17 * 23?")
    assert fresh.outputs == one.outputs
    assert len({r.request_id for r in fresh.trace.nodes["calc"].requests}) == 2
    await _settled(real_llm, base)


async def test_failing_and_hanging_tools_resume_with_an_error(real_llm):
    base = (await real_llm.stats()).kv_blocks_used
    for tool, error in ((broken, "the calculator is on fire"), (stuck, "timed out after 0.2s")):
        result = await Runtime(real_llm).run_traced(_calc_app(tool), question="What is 2 + 2?")
        node = result.trace.nodes["calc"]
        (call,) = node.tool_calls
        assert error in call.error and call.result.startswith("error: tool")
        # resumed with the error text, then the answer turn ran to its end (what ends it,
        # the stop string or max_tokens, is the model's business)
        assert [r.finish_reason for r in node.requests][0] == "paused"
        assert node.requests[1].finish_reason in ("stop", "length")
        assert isinstance(result.outputs["answer"], str)
        await _settled(real_llm, base)


async def test_cancelled_while_paused_frees_everything(real_llm):
    global GATE
    GATE = asyncio.Event()
    base = (await real_llm.stats()).kv_blocks_used
    task = asyncio.ensure_future(Runtime(real_llm).run(_calc_app(waits), question="2 + 2?"))
    for _ in range(3000):
        if (await real_llm.stats()).num_paused == 1:
            break
        await asyncio.sleep(0.01)
    assert (await real_llm.stats()).num_paused == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await _settled(real_llm, base)


def test_invalid_calls_are_reported_and_never_run():
    box = _agent(1).op.tools
    RUNS.clear()
    cases = {
        "not json": "not valid JSON",
        '{"name": "rm", "arguments": {}}': "unknown tool 'rm'; tools: calculator",
        '{"name": "calculator", "arguments": {"expr": "1"}}': "bad arguments for 'calculator'",
        '{"name": "calculator", "arguments": {"expression": 3}}': "expression: Input should be",
        '{"name": "calculator", "arguments": [1]}': "must be a JSON object",
    }
    for body, error in cases.items():
        call = parse_call(body, box)
        assert isinstance(call, BadCall) and error in call.error, (body, call)
    ok = parse_call('{"name": "calculator", "arguments": {"expression": "6 * 7"}}', box)
    assert isinstance(ok, ToolCall) and ok.kwargs == {"expression": "6 * 7"}
    assert RUNS == []


def _agent(max_calls: int, choices: tuple[str, ...] = ("a", "b")):
    """A gen constrained (choices) to write one of `choices`, so the model's calls are
    known without trusting a 135M model to write JSON."""

    @cg.semantic_function(
        params=replace(GREEDY, choices=choices), tools=[calculator], max_tool_calls=max_calls
    )
    def agent(question: str):
        """{{#user}}{{question}}{{#assistant}}{{gen answer}}"""

    return agent


VALID = tuple(
    '<tool_call>{"name": "calculator", "arguments": {"expression": "' + e + '"}}' + CALL_CLOSE
    for e in ("6 * 7", "2 + 2")
)
INVALID = (
    '<tool_call>{"name": "rm", "arguments": {"path": "/"}}' + CALL_CLOSE,
    '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}' + CALL_CLOSE,
)


async def test_model_calls_are_run_capped_and_resumed(real_llm):
    agent = _agent(2, VALID)

    @cg.app
    def ask(question: str):
        return agent(question)

    RUNS.clear()
    base = (await real_llm.stats()).kv_blocks_used
    result = await Runtime(real_llm).run_traced(ask, question="What is 6 * 7?")
    node = result.trace.nodes["agent"]
    assert [c.by for c in node.tool_calls] == ["model", "model"]  # capped at 2
    assert len(RUNS) == 2 and all(c.error is None for c in node.tool_calls)
    assert all(c.result in ("42", "4") for c in node.tool_calls)
    assert len({r.request_id for r in node.requests}) == 1 and len(node.requests) == 3
    assert result.outputs["answer"] in VALID  # the last turn, past the cap, is only text
    await _settled(real_llm, base)


async def test_invalid_model_calls_go_back_as_errors_and_never_run(real_llm):
    agent = _agent(2, INVALID)

    @cg.app
    def ask(question: str):
        return agent(question)

    RUNS.clear()
    base = (await real_llm.stats()).kv_blocks_used
    result = await Runtime(real_llm).run_traced(ask, question="Delete everything")
    node = result.trace.nodes["agent"]
    assert RUNS == [] and len(node.tool_calls) == 2
    assert all(c.result.startswith("error: ") for c in node.tool_calls)
    assert {c.tool for c in node.tool_calls} <= {"rm", "calculator"}
    await _settled(real_llm, base)
