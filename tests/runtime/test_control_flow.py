"""Control flow on the embedded model: only the taken branch's LLM calls run (per the
trace), every branch's static start is pinned ahead, loops stop at their predicate or at
max_iters with each iteration's outputs in the trace, and run-time mistakes fail clearly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import covey.graph as cg
from covey.errors import NodeExecutionError
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import NodeFinished, NodeStarted, RunFinished, Runtime

from .conftest import make_cpu_engine
from .fakes import FakeLLM

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@cg.semantic_function(params=GREEDY)
def classify(ticket: str):
    """Ticket: {{ticket}}
Is this about hardware or billing? Answer:{{gen category choices=" hardware| billing"}}"""


@cg.semantic_function(params=GREEDY)
def hardware_reply(ticket: str):
    """{{#system}}
You are the hardware desk of a laptop shop. You help with broken screens, keyboards,
batteries and chargers, and you always ask for the serial number of the device first.
{{#user}}
{{ticket}}
{{#assistant}}
{{gen reply}}"""


@cg.semantic_function(params=GREEDY)
def billing_reply(ticket: str):
    """{{#system}}
You are the billing desk of a laptop shop. You explain invoices, refunds and payment
plans, and you always ask for the order number and the date of the purchase first.
{{#user}}
{{ticket}}
{{#assistant}}
{{gen reply}}"""


@cg.app
def desk(ticket: str, kind: str):
    return cg.route(
        kind,
        {"hardware": lambda: hardware_reply(ticket), "billing": lambda: billing_reply(ticket)},
    )


@cg.app
def triage(ticket: str):
    category = classify(ticket)
    reply = cg.route(
        category,
        {" hardware": lambda: hardware_reply(ticket), " billing": lambda: billing_reply(ticket)},
    )
    return {"category": category, "reply": reply}


TICKET = "My screen stays black when I open the lid."
BRANCHES = {"hardware": "hardware_reply", "billing": "billing_reply"}


@pytest.mark.parametrize("kind", list(BRANCHES))
async def test_only_the_taken_branch_sends_engine_requests(real_llm, kind):
    runtime = Runtime(real_llm)
    events = [e async for e in runtime.stream(desk, ticket=TICKET, kind=kind)]
    finished = events[-1]
    assert isinstance(finished, RunFinished)
    nodes = finished.trace.nodes
    taken, other = BRANCHES[kind], next(n for k, n in BRANCHES.items() if k != kind)
    assert nodes["route"].outputs == {"branch": kind}
    assert nodes[taken].status == "ok" and len(nodes[taken].requests) == 1
    assert nodes[other].status == "skipped" and nodes[other].requests == []
    assert finished.outputs["reply"] == nodes[taken].outputs["reply"] != ""
    started = {e.node for e in events if isinstance(e, NodeStarted)}
    assert taken in started and other not in started
    merge = next(e for e in events if isinstance(e, NodeFinished) and e.node == "route_merge")
    assert merge.outputs == {"reply": finished.outputs["reply"]}


async def test_routing_on_the_models_answer_runs_the_branch_it_chose(real_llm):
    result = await Runtime(real_llm).run_traced(triage, ticket=TICKET)
    category = result.outputs["category"]
    assert category in (" hardware", " billing")
    nodes = result.trace.nodes
    taken = BRANCHES[category.strip()]
    assert [n for n, t in nodes.items() if t.requests] == ["classify", taken]
    assert result.outputs["reply"] == nodes[taken].outputs["reply"]


async def test_every_branchs_static_start_is_pinned_so_a_first_taken_branch_hits_the_cache():
    cached = {}
    for optimize in (True, False):
        llm = AsyncLLM(engine=make_cpu_engine())
        try:
            runtime = Runtime(llm, optimize=optimize)
            await runtime.run(desk, ticket=TICKET, kind="hardware")
            if optimize:  # the untaken billing branch's system prompt was pinned too
                assert len(runtime.pins) == 2
            second = await runtime.run_traced(desk, ticket=TICKET, kind="billing")
            cached[optimize] = second.trace.nodes["billing_reply"].cached_tokens
        finally:
            await llm.close()
    assert cached[True] >= 32  # the billing system prompt, never run before, came cached
    assert cached[True] > cached[False]


async def test_a_value_no_branch_takes_fails_the_run_naming_it(real_llm):
    with pytest.raises(NodeExecutionError, match=r"value 'returns' matches no branch"):
        await Runtime(real_llm).run(desk, ticket=TICKET, kind="returns")


@cg.function
def step(n: int) -> int:
    return n + 1


def _counter(max_iters: int, **predicate) -> cg.App:
    @cg.app
    def count(start: int):
        out = cg.loop(lambda n: {"n": step(n)}, init={"n": start}, max_iters=max_iters,
                      **predicate)
        return {"n": out.n, "iterations": out.iterations}

    return count


@pytest.mark.parametrize(
    ("max_iters", "predicate", "ran"),
    [
        (5, {"until": lambda n: n >= 2}, 2),  # stops when the predicate holds
        (3, {"while_": lambda n: n < 10}, 3),  # stops at the bound
        (4, {"until": lambda n: True}, 1),  # the first iteration always runs
    ],
)
async def test_loop_bounds(real_llm, max_iters, predicate, ran):
    result = await Runtime(real_llm).run_traced(_counter(max_iters, **predicate), start=0)
    assert result.outputs == {"n": ran, "iterations": ran}
    nodes = result.trace.nodes
    word = "until" if "until" in predicate else "while"
    for k in range(1, max_iters + 1):
        status = "ok" if k <= ran else "skipped"
        assert nodes[f"step@{k}"].status == status, k
        assert nodes[f"loop_{word}@{k}"].status == status, k
    for k in range(1, ran + 1):  # each iteration's outputs stay in the trace
        assert nodes[f"step@{k}"].outputs == {"result": k}
        assert nodes[f"loop_{word}@{k}"].outputs == {"again": k < ran or k == max_iters}


@cg.semantic_function(params=GREEDY)
def rewrite(query: str):
    """Rewrite this search query to be more specific: {{query}}
Query:{{gen better stop="\\n"}}"""


@cg.app
def retry(question: str):
    out = cg.loop(
        lambda query: {"query": rewrite(query)},
        init={"query": question},
        until=lambda query: "never" in query,
        max_iters=2,
    )
    return {"query": out.query, "iterations": out.iterations}


async def test_each_iteration_runs_its_llm_call_on_the_previous_output(real_llm):
    result = await Runtime(real_llm).run_traced(retry, question="open a file in python")
    nodes = result.trace.nodes
    first, second = nodes["rewrite@1"], nodes["rewrite@2"]
    assert len(first.requests) == len(second.requests) == 1
    assert result.outputs == {"query": second.outputs["better"], "iterations": 2}
    direct = await Runtime(real_llm).run(
        cg.app(lambda query: rewrite(query), name="once"), query=first.outputs["better"]
    )
    assert direct["better"] == second.outputs["better"]


async def test_a_predicate_that_returns_no_bool_fails_clearly(real_llm):
    app = _counter(2, until=lambda n: "yes")
    with pytest.raises(NodeExecutionError, match=r"until predicate returned 'yes' \(str\)"):
        await Runtime(real_llm).run(app, start=0)


@cg.function
def parity(n: int) -> str:
    return "even" if n % 2 == 0 else "odd"


@cg.function
def halve(n: int) -> int:
    return n // 2


@cg.function
def triple_plus_one(n: int) -> int:
    return 3 * n + 1


@cg.app
def collatz(start: int):
    def body(n):
        nxt = cg.route(parity(n), {"even": lambda: halve(n)}, default=lambda: triple_plus_one(n))
        return {"n": nxt}

    out = cg.loop(body, init={"n": start}, until=lambda n: n == 1, max_iters=7, name="steps")
    return {"n": out.n, "iterations": out.iterations}


async def test_a_route_inside_a_loop_takes_its_own_branch_in_each_iteration(real_llm):
    result = await Runtime(real_llm).run_traced(collatz, start=6)  # 6 3 10 5 16 8 4 2 1
    assert result.outputs == {"n": 2, "iterations": 7}  # stopped by max_iters, not at 1
    nodes = result.trace.nodes
    taken = [nodes[f"route@{k}"].outputs["branch"] for k in range(1, 8)]
    assert taken == ["even", "<default>", "even", "<default>", "even", "even", "even"]
    assert nodes["halve@2"].status == "skipped" and nodes["triple_plus_one@2"].outputs == {
        "result": 10
    }
    short = await Runtime(real_llm).run_traced(collatz, start=4)  # 4 2 1
    assert short.outputs == {"n": 1, "iterations": 2}
    assert all(short.trace.nodes[f"route@{k}"].status == "skipped" for k in range(3, 8))


# The apps below wire only @cg.function nodes, so no engine request is ever sent: a
# FakeLLM stands in for the engine the Runtime needs to exist.


@cg.function
def inc(n: int) -> int:
    return n + 1


@cg.function
def note(n: int) -> str:
    return f"note {n}"


async def test_a_body_output_named_again_keeps_its_own_value():
    """The loop carries each check's decision on a port no output name can take, so the
    last iteration's `note` is neither replaced nor pruned (no UnusedOutputWarning)."""

    def noting(start: int):
        def body(n):
            m = inc(n)
            return {"n": m, "again": note(m)}

        out = cg.loop(body, init={"n": start}, until=lambda n: n >= 2, max_iters=3)
        return {"again": out.again, "n": out.n, "iterations": out.iterations}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noting = cg.app(noting)

    result = await Runtime(FakeLLM()).run(noting, start=0)
    assert result == {"again": "note 2", "n": 2, "iterations": 2}


async def test_a_branch_key_with_a_colon_runs_its_branch():
    @cg.app
    def typed(kind: str, n: int):
        return cg.route(kind, {"type:a": lambda: inc(n)}, default=lambda: n)

    runtime = Runtime(FakeLLM())
    assert await runtime.run(typed, kind="type:a", n=1) == {"result": 2}
    assert await runtime.run(typed, kind="type:b", n=1) == {"result": 1}


async def test_a_predicate_may_return_a_numpy_bool():
    @cg.app
    def counting(start: int):
        out = cg.loop(
            lambda n: {"n": inc(n)},
            init={"n": start},
            until=lambda n: np.int64(n) >= 2,
            max_iters=5,
        )
        return {"n": out.n, "iterations": out.iterations}

    assert await Runtime(FakeLLM()).run(counting, start=0) == {"n": 2, "iterations": 2}
