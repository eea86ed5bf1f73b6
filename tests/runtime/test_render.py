"""Prompt rendering: chat roles through the chat template, plain templates as tagged segments."""

from __future__ import annotations

import covey.graph as cg
from covey.llm_backend.segments import Segment
from covey.retrieval.documents import Chunk, SearchResult
from covey.runtime import render_prompts
from tests.graph import shapes

from .fakes import FakeTokenizer


def _results(*texts: str) -> list[SearchResult]:
    return [SearchResult(Chunk(f"id{i}", t, "src", 0, len(t), 2), 1.0) for i, t in enumerate(texts)]


def test_roles_render_through_the_chat_template_with_retrieved_text():
    node = shapes.linear().plan.nodes["answer"]
    values = {"question": "Why?", "retrieve.results": _results("one", "two")}
    prompts = render_prompts(node.primitives, lambda p: values[p.var], FakeTokenizer(), True, {})
    assert prompts == {
        "answer.answer": "<system>Answer from the context only.</system>"
        "<user>Question: Why?\nContext: one\n\ntwo</user><assistant>"
    }


def test_plain_templates_become_segments_tagged_by_kind():
    @cg.semantic_function
    def cite(question: str, docs: list[SearchResult]):
        """Docs: {{docs}}
        Q: {{question}}
        A: {{gen answer max_tokens=4}}
        Source: {{gen source max_tokens=2}}"""

    @cg.app
    def app(question: str, docs: list[SearchResult]):
        return cite(question, docs)

    values = {"question": "Why?", "docs": _results("one", "two")}
    node = app.plan.nodes["cite"]
    prompts = render_prompts(
        node.primitives, lambda p: values[p.var], None, False, {"cite.answer": ("ok", [7, 8])}
    )
    first = [
        Segment("Docs: ", kind="static"),
        Segment("one", kind="chunk", chunk_id="id0"),
        Segment("\n\n", kind="static"),
        Segment("two", kind="chunk", chunk_id="id1"),
        Segment("\nQ: ", kind="static"),
        Segment("Why?", kind="dynamic"),
        Segment("\nA: ", kind="static"),
    ]
    assert prompts["cite.answer"] == first
    assert prompts["cite.source"] == [
        *first,
        Segment(token_ids=(7, 8), kind="dynamic"),
        Segment("\nSource: ", kind="static"),
    ]


def test_chat_gens_continue_the_open_assistant_message_and_close_it_on_a_new_turn():
    @cg.semantic_function
    def chat(question: str):
        """{{#user}}
        {{question}}
        {{#assistant}}
        Answer: {{gen answer max_tokens=4}} Sure? {{gen sure max_tokens=2}}
        {{#user}}
        Shorter.
        {{#assistant}}
        {{gen short max_tokens=4}}"""

    @cg.app
    def app(question: str):
        return chat(question)

    node = app.plan.nodes["chat"]
    generated = {"chat.answer": ("42", [1]), "chat.sure": ("yes", [2])}
    prompts = render_prompts(node.primitives, lambda p: "Why?", FakeTokenizer(), True, generated)
    assert prompts == {
        "chat.answer": "<user>Why?</user><assistant>Answer: ",
        "chat.sure": "<user>Why?</user><assistant>Answer: 42 Sure? ",
        "chat.short": "<user>Why?</user><assistant>Answer: 42 Sure? yes</assistant>"
        "<user>Shorter.</user><assistant>",
    }
