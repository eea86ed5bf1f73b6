"""A triage app on the embedded model: whole-option choices and token healing through the
runtime, with every option's log-probability in the trace."""

from __future__ import annotations

import covey.graph as cg
from covey.graph.lowering import Primitive
from covey.llm_backend.segments import Segment
from covey.runtime import Runtime
from covey.runtime.render import Context

TEAMS = ("hardware repair", "billing", "account access", "shipping")


@cg.semantic_function
def classify(ticket: str):
    """{{#system}}
    You route customer support tickets to a team.
    {{#user}}
    {{ticket}}
    {{#assistant}}
    Team: {{gen team choices="hardware repair|billing|account access|shipping"}}
    Urgent: {{gen urgent choices="yes|no"}}"""


@cg.app
def triage(ticket: str):
    return classify(ticket)


async def test_a_triage_app_scores_whole_options_after_a_healed_space(real_llm):
    gens = {g.name: g for g in classify.op.template.gens}
    assert gens["team"].params.token_healing  # "Team: " ends inside a token
    runtime = Runtime(real_llm)
    result = await runtime.run_traced(triage, ticket="I was charged twice this month.")
    assert result.outputs["team"] in TEAMS and result.outputs["urgent"] in ("yes", "no")
    (team, urgent) = result.trace.nodes["classify"].requests
    assert set(team.choice_logprobs) == set(TEAMS)
    assert set(urgent.choice_logprobs) == {"yes", "no"}
    assert all(lp < 0 for lp in team.choice_logprobs.values())


def test_a_healed_gen_continues_as_text_joined_to_the_text_before_it():
    """Its first token holds the prompt's healed end (" Ada" after "Name: "), so its ids
    cannot follow the prompt's; its text joins the text before it instead."""
    ctx = Context(None, uses_roles=False)
    ctx.add_prefill(Primitive("prefill", None, "static", text="Name: "), None)
    ctx.add_generated(None, "Ada", [])
    assert ctx.prompt() == [Segment("Name: Ada", kind="static")]
