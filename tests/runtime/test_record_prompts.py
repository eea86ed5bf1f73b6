"""`record_prompts=True` on the embedded model: the trace and the stream show each LLM
request's exact prompt (trailing spaces, earlier gens' outputs, the chat template's own
markup); without it nothing is recorded."""

from __future__ import annotations

import covey.graph as cg
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import PromptRendered, RunFinished, Runtime, TokenDelta

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@cg.semantic_function(params=GREEDY)
def triage(text: str):
    """Ticket: {{text}} Category: {{gen category}} Urgency:{{gen urgency max_tokens=3}}"""


@cg.semantic_function(params=GREEDY)
def reply(category: str):
    """{{#system}}
    You answer support tickets.
    {{#user}}
    A {{category}} ticket came in.
    {{#assistant}}
    {{gen answer}}"""


@cg.app
def support(text: str):
    t = triage(text)
    return {"category": t.category, "urgency": t.urgency, "answer": reply(t.category)}


TICKET = "my printer is on fire"


async def test_the_trace_records_each_request_s_exact_prompt(real_llm):
    result = await Runtime(real_llm).run_traced(support, TICKET, record_prompts=True)
    out, nodes = result.outputs, result.trace.nodes
    category, urgency = nodes["triage"].requests
    assert category.prompt == f"Ticket: {TICKET} Category: "  # the space before the gen
    # the second gen reads the first one's output (token ids, decoded) in place
    assert urgency.prompt == f"Ticket: {TICKET} Category: {out['category']} Urgency:"
    (answer,) = nodes["reply"].requests
    chat = real_llm.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You answer support tickets."},
            {"role": "user", "content": f"A {out['category']} ticket came in."},
        ]
    )
    assert answer.prompt == chat and answer.prompt.startswith("<|im_start|>system\n")


async def test_the_stream_shows_each_prompt_before_its_tokens_and_only_when_asked(real_llm):
    runtime = Runtime(real_llm)
    events = [e async for e in runtime.stream(support, text=TICKET, record_prompts=True)]
    rendered = [e for e in events if isinstance(e, PromptRendered)]
    assert [(e.node, e.var) for e in rendered] == [
        ("triage", "triage.category"),
        ("triage", "triage.urgency"),
        ("reply", "reply.answer"),
    ]
    finished = events[-1]
    assert isinstance(finished, RunFinished)
    recorded = [r.prompt for n in ("triage", "reply") for r in finished.trace.nodes[n].requests]
    assert [e.prompt for e in rendered] == recorded
    first_answer_token = next(
        i for i, e in enumerate(events) if isinstance(e, TokenDelta) and e.var == "reply.answer"
    )
    assert events.index(rendered[-1]) < first_answer_token

    plain = [e async for e in runtime.stream(support, text=TICKET)]
    assert not [e for e in plain if isinstance(e, PromptRendered)]
    trace = plain[-1].trace
    assert not trace.record_prompts
    assert all(r.prompt is None for n in trace.nodes.values() for r in n.requests)
