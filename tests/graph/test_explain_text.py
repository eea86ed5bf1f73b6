"""`explain()` shows each static segment's text as Python writes it: a trailing space before
a gen (which changes what the model generates) or a newline is visible, and a long segment
keeps its exact start and end."""

from __future__ import annotations

import ast

import covey.graph as cg


@cg.semantic_function
def classify(text: str):
    """Ticket: {{text}}
Category: {{gen category max_tokens=3}}"""


@cg.semantic_function
def long_intro(text: str):
    """You are a careful support engineer who reads every ticket twice. Ticket: {{text}} Answer: {{gen answer max_tokens=3}}"""  # noqa: E501


@cg.app
def triage(text: str):
    return {"category": classify(text), "answer": long_intro(text)}


def test_segment_text_keeps_its_whitespace():
    text = triage.explain()
    assert "prefill[static,pin]('Ticket: ')" in text
    assert "prefill[static]('\\nCategory: ')" in text  # the space before the gen shows
    assert "'Category:'" not in text


def test_a_long_segment_shows_its_exact_start_and_end():
    text = triage.explain()
    first = triage.plan.nodes["long_intro"].primitives[0].describe()
    head, tail = first.removeprefix("prefill[static,pin](").removesuffix(")").split("...")
    static = "You are a careful support engineer who reads every ticket twice. Ticket: "
    start, end = ast.literal_eval(head), ast.literal_eval(tail)
    assert len(start) == len(end) == 16
    assert static.startswith(start) and static.endswith(end) and end.endswith("Ticket: ")
    assert first in text
