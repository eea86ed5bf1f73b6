"""Semantic functions and apps of the graph shapes the tests share: linear, branch, merge,
fan-out/map-reduce. Building them never runs a model."""

from __future__ import annotations

import covey.graph as cg
from covey.retrieval.documents import SearchResult


@cg.semantic_function
def rewrite(question: str):
    """{{#system}}
    You rewrite questions into search queries.
    {{#user}}
    {{question}}
    {{#assistant}}
    {{gen query max_tokens=32 stop="\\n"}}"""


@cg.semantic_function
def answer(question: str, context: list[SearchResult]):
    """{{#system}}
    Answer from the context only.
    {{#user}}
    Question: {{question}}
    Context: {{context}}
    {{#assistant}}
    {{gen answer max_tokens=128}}"""


@cg.semantic_function
def argue_for(question: str):
    """{{#system}}
    You are a careful debater.
    {{#user}}
    {{question}}
    Argue for it.
    {{#assistant}}
    {{gen argument max_tokens=64}}"""


@cg.semantic_function
def argue_against(question: str):
    """{{#system}}
    You are a careful debater.
    {{#user}}
    {{question}}
    Argue against it.
    {{#assistant}}
    {{gen argument max_tokens=32}}"""


@cg.semantic_function
def judge(pro: str, con: str):
    """For: {{pro}}
    Against: {{con}}
    Verdict: {{gen verdict choices="for|against"}}"""


@cg.semantic_function
def summarize(doc: SearchResult, question: str):
    """Summarize for the question {{question}}.
    Text: {{doc}}
    Summary: {{gen summary max_tokens=48}}"""


@cg.semantic_function
def combine(question: str, summaries: list[str]):
    """Question: {{question}}
    Notes: {{summaries}}
    Answer: {{gen answer max_tokens=96}}"""


@cg.semantic_function
def title(question: str):
    """Title for: {{question}}
    {{gen title max_tokens=8}}"""


@cg.tool
def lookup(query: str) -> list[str]:
    """Stands in for a slow external search."""
    return [query]


@cg.function
def bullet(facts: list[str]) -> str:
    return "\n".join(f"- {f}" for f in facts)


@cg.semantic_function
def reply(question: str, facts: str):
    """{{#system}}
    Answer from the facts.
    {{#user}}
    {{question}}
    Facts:
    {{facts}}
    {{#assistant}}
    {{gen reply max_tokens=64}}"""


def tool_chain() -> cg.App:
    @cg.app(name="agent")
    def build(question: str) -> str:
        return reply(question, bullet(lookup(rewrite(question))))

    return build


def linear() -> cg.App:
    @cg.app
    def rag(question: str) -> str:
        return answer(question=question, context=cg.retrieve(rewrite(question), k=3))

    return rag


def branch() -> cg.App:
    @cg.app
    def debate(question: str):
        return {"pro": argue_for(question), "con": argue_against(question)}

    return debate


def merge() -> cg.App:
    @cg.app
    def verdict(question: str) -> str:
        return judge(pro=argue_for(question), con=argue_against(question))

    return verdict


def map_reduce() -> cg.App:
    @cg.app
    def digest(question: str) -> str:
        docs = cg.retrieve(question, k=8)
        notes = cg.map(summarize, over=docs, question=question)
        return combine(question=question, summaries=notes)

    return digest


def two_outputs() -> cg.App:
    @cg.app
    def titled(question: str):
        docs = cg.retrieve(question)
        return {"answer": answer(question, docs), "title": title(question)}

    return titled
