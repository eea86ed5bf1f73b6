"""End to end on the embedded model: the runtime sends exactly the prompts it renders."""

from __future__ import annotations

import pytest

import covey.graph as cg
from covey.errors import ErrorCategory, InvalidRequestError, NodeExecutionError
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import Runtime, render_prompts

from .conftest import make_cpu_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@cg.semantic_function(params=GREEDY)
def name_it(thing: str):
    """A short name for {{thing}}:{{gen name max_tokens=6}}"""


@cg.semantic_function(params=GREEDY)
def describe(name: str):
    """{{#system}}
    You describe things in one sentence.
    {{#user}}
    Describe {{name}}.
    {{#assistant}}
    {{gen text}}"""


@cg.app
def naming(thing: str):
    name = name_it(thing)
    return {"name": name, "text": describe(name)}


def _direct(prompts: list) -> list[tuple[str, int]]:
    """(text, token count) of each prompt run alone through a fresh engine, no prefix cache."""
    engine = make_cpu_engine(enable_prefix_caching=False)
    outs = []
    for i, (prompt, params) in enumerate(prompts):
        (final,) = engine.run_to_completion([engine.add_request(prompt, params, str(i))])
        outs.append((final.text, len(final.token_ids)))
    return outs


async def test_two_calls_match_the_engine_run_directly(real_llm):
    runtime = Runtime(real_llm)
    result = await runtime.run_traced(naming, thing="a red bicycle")
    name, text = result.outputs["name"], result.outputs["text"]
    assert name and text
    plan = naming.plan
    tokenizer = real_llm.tokenizer
    first = render_prompts(
        plan.nodes["name_it"].primitives, lambda p: "a red bicycle", None, False, {}
    )
    second = render_prompts(plan.nodes["describe"].primitives, lambda p: name, tokenizer, True, {})
    assert second["describe.text"].startswith("<|im_start|>system\nYou describe things")
    name_params = plan.nodes["name_it"].primitives[-1].params
    direct = _direct([(first["name_it.name"], name_params), (second["describe.text"], GREEDY)])
    requests = [result.trace.nodes[n].requests[0] for n in ("name_it", "describe")]
    assert direct == [(name, requests[0].generated_tokens), (text, requests[1].generated_tokens)]

    again = await runtime.run_traced(naming, thing="a red bicycle")
    assert again.outputs == result.outputs
    assert again.trace.cached_tokens > 0  # the second run hits the prefix cache


@cg.semantic_function
def overlong(thing: str):
    """Describe {{thing}} at length: {{gen text max_tokens=2000}}"""


@cg.app
def overlong_app(thing: str):
    return overlong(thing=thing)


async def test_a_gen_option_the_engine_refuses_keeps_its_category_through_the_node():
    llm = AsyncLLM(engine=make_cpu_engine(kv_cache_tokens=512))
    try:
        with pytest.raises(NodeExecutionError, match=r"node 'overlong' \(llm\) failed") as info:
            await Runtime(llm).run(overlong_app, thing="a kite")
    finally:
        await llm.close()
    assert isinstance(info.value.__cause__, InvalidRequestError)
    assert info.value.category is ErrorCategory.INVALID and info.value.node == "overlong"
