"""The optimizer changes how an app with branches and a loop runs, never what it returns:
greedy outputs in float32 are identical with `optimize=True` (every branch's static start
pinned ahead, prefill-ahead, priorities) and with the naive plan (one node at a time), each
on a fresh engine."""

from __future__ import annotations

import covey.graph as cg
from covey.llm_backend.sampling_params import SamplingParams
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.retrieval.documents import SearchResult

from .conftest import fresh_runtime

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
QUESTION = "What if a dict key is missing?"


@cg.semantic_function(params=GREEDY)
def kind(question: str):
    """Question: {{question}}
Is this a question about Python code? Answer:{{gen kind choices=" yes| no"}}"""


@cg.semantic_function(params=GREEDY)
def answer_from_docs(question: str, context: list[SearchResult]):
    """{{#system}}
You answer questions about Python from the documentation below, in one sentence.
{{context}}
{{#user}}
{{question}}
{{#assistant}}
{{gen answer}}"""


@cg.semantic_function(params=GREEDY)
def answer_plainly(question: str):
    """{{#system}}
You answer general questions in one short sentence.
{{#user}}
{{question}}
{{#assistant}}
{{gen answer}}"""


@cg.semantic_function(params=SamplingParams(max_tokens=8, temperature=0.0))
def shorten(text: str):
    """Make this shorter: {{text}}
Shorter:{{gen shorter stop="\\n"}}"""


@cg.app
def routed_help(question: str):
    category = kind(question)
    answer = cg.route(
        category,
        {
            " yes": lambda: answer_from_docs(
                question, cg.retrieve(question, k=2, index=DEFAULT_INDEX_NAME)
            )
        },
        default=lambda: answer_plainly(question),
    )
    short = cg.loop(
        lambda text: {"text": shorten(text)},
        init={"text": answer},
        until=lambda text: len(text) < 12,
        max_iters=2,
    )
    return {"kind": category, "answer": answer, "short": short.text, "rounds": short.iterations}


async def test_an_app_with_a_route_and_a_loop_gives_the_same_outputs_optimized(tiny_index):
    outputs, ran = {}, {}
    for optimize in (True, False):
        llm, runtime = fresh_runtime(tiny_index, optimize=optimize)
        try:
            result = await runtime.run_traced(routed_help, question=QUESTION)
        finally:
            await llm.close()
        outputs[optimize] = result.outputs
        ran[optimize] = sorted(n for n, t in result.trace.nodes.items() if t.status == "ok")
    assert outputs[True] == outputs[False]
    assert ran[True] == ran[False]  # the same branch and the same iterations ran
    out = outputs[True]
    assert out["answer"] and out["short"] and out["rounds"] in (1, 2)
    taken, untaken = ("answer_from_docs", "answer_plainly")[:: 1 if out["kind"] == " yes" else -1]
    assert taken in ran[True] and untaken not in ran[True]
