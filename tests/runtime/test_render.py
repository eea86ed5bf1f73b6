"""Prompt rendering: chat roles through the chat template, plain templates as tagged segments."""

from __future__ import annotations

import covey.graph as cg
from covey.llm_backend.segments import Segment
from covey.retrieval.documents import Chunk, SearchResult
from covey.runtime import render_prompts
from covey.runtime.render import leading_prompt
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


class FoldingTokenizer(FakeTokenizer):
    """Folds the system prompt into the last user message, as Mistral-style templates do."""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        system = "".join(m["content"] for m in messages if m["role"] == "system")
        rest = [dict(m) for m in messages if m["role"] != "system"]
        users = [m for m in rest if m["role"] == "user"]
        if users:
            users[-1]["content"] = system + "|" + users[-1]["content"]
        return super().apply_chat_template(rest, add_generation_prompt)


class LengthHeaderTokenizer(FakeTokenizer):
    """Starts with the length of the last message: no prefix holds whatever comes later."""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        head = f"<{len(messages[-1]['content'])}>"
        return head + super().apply_chat_template(messages, add_generation_prompt)


def test_the_leading_prompt_is_exactly_how_the_full_prompt_begins():
    node = shapes.linear().plan.nodes["answer"]
    values = {"question": "Why?", "retrieve.results": _results("one", "two")}
    resolve = lambda p: values[p.var]  # noqa: E731
    full = render_prompts(node.primitives, resolve, FakeTokenizer(), True, {})["answer.answer"]
    count = next(i for i, p in enumerate(node.primitives) if p.kind == "chunk")
    head = leading_prompt(node.primitives, count, resolve, FakeTokenizer(), True)
    assert head and full.startswith(head) and head.endswith("Context: ")


def test_a_template_whose_start_depends_on_later_text_gets_no_leading_prompt():
    @cg.semantic_function
    def ask(question: str, notes: str):
        """{{#system}}
        Be brief.
        {{#user}}
        {{question}}
        {{#assistant}}
        Sure.
        {{#user}}
        {{notes}}
        {{#assistant}}
        {{gen reply}}"""

    @cg.app
    def folded(question: str, notes: str):
        return ask(question=question, notes=notes)

    prims = folded.plan.nodes["ask"].primitives
    count = next(i for i, p in enumerate(prims) if p.var == "notes")
    values = {"question": "Why?", "notes": "Because."}
    resolve = lambda p: values[p.var]  # noqa: E731
    for tokenizer in (FakeTokenizer(), FoldingTokenizer()):  # folding keeps the prefix
        full = render_prompts(prims, resolve, tokenizer, True, {})["ask.reply"]
        head = leading_prompt(prims, count, resolve, tokenizer, True)
        assert head and full.startswith(head)
    assert leading_prompt(prims, count, resolve, LengthHeaderTokenizer(), True) is None
