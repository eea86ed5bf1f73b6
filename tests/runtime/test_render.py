"""Prompt rendering: chat roles through the chat template, plain templates as tagged segments."""

from __future__ import annotations

import covey.graph as cg
from covey.llm_backend.segments import Segment
from covey.retrieval.documents import Chunk, SearchResult
from covey.runtime import render_prompts
from covey.runtime.render import chunk_segment, leading_prompt, to_text
from tests.graph import shapes

from .fakes import FakeTokenizer


def _results(*texts: str) -> list[SearchResult]:
    return [SearchResult(Chunk(f"id{i}", t, "src", 0, len(t), 2), 1.0) for i, t in enumerate(texts)]


def test_roles_render_through_the_chat_template_with_retrieved_text():
    node = shapes.linear().plan.nodes["answer"]
    values = {"question": "Why?", "retrieve.results": _results("one", "two")}
    prompts = render_prompts(node.primitives, lambda p: values[p.var], FakeTokenizer(), True, {})
    assert prompts == {
        "answer.answer": [
            Segment(
                "<system>Answer from the context only.</system><user>Question: Why?\nContext: ",
                kind="dynamic",
            ),
            Segment("one", kind="chunk", chunk_id="id0"),
            Segment("\n\n", kind="static"),
            Segment("two", kind="chunk", chunk_id="id1"),
            Segment("</user><assistant>", kind="static"),
        ]
    }
    # The same text the chat template renders as one string, as an engine without
    # segments still receives it.
    plain = render_prompts(
        node.primitives, lambda p: values[p.var], FakeTokenizer(), True, {}, as_text=True
    )
    assert plain == {
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
    prompts = render_prompts(node.primitives, resolve, FakeTokenizer(), True, {})
    full = to_text(prompts["answer.answer"])
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


def test_a_leading_chat_prompt_past_a_chunk_keeps_the_chunk_a_segment():
    node = shapes.linear().plan.nodes["answer"]
    values = {"question": "Why?", "retrieve.results": _results("one", "two")}
    resolve = lambda p: values[p.var]  # noqa: E731
    full = render_prompts(node.primitives, resolve, FakeTokenizer(), True, {})["answer.answer"]
    count = 1 + max(i for i, p in enumerate(node.primitives) if p.kind == "chunk")
    head = leading_prompt(node.primitives, count, resolve, FakeTokenizer(), True)
    assert isinstance(head, list) and isinstance(full, list)
    assert head == full[: len(head) - 1] + [head[-1]]  # all but an open last piece match
    assert [s for s in head if s.kind == "chunk"] == [s for s in full if s.kind == "chunk"]
    assert to_text(full).startswith(to_text(head))


class StrippingTokenizer(FakeTokenizer):
    """Strips every message's content, as some templates do."""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        stripped = [{**m, "content": m["content"].strip()} for m in messages]
        return super().apply_chat_template(stripped, add_generation_prompt)


def _passages_app():
    @cg.semantic_function
    def ask(passages: list[Segment], question: str):
        """{{#user}}
        {{passages}}
        {{question}}
        {{#assistant}}
        {{gen answer}}"""

    @cg.app
    def app(passages: list[Segment], question: str):
        return ask(passages=passages, question=question)

    return app.plan.nodes["ask"].primitives


PIECES = [
    Segment("[1] (src)\n", kind="static"),
    chunk_segment(Chunk("c1", "Alpha.", "src", 0, 6, 2)),
    Segment("\n\n[2] (src)\n", kind="static"),
    chunk_segment(Chunk("c2", "Beta. ", "src", 0, 6, 2)),
]


def test_ready_pieces_in_a_chat_message_split_out_their_chunks():
    values = {"passages": PIECES, "question": "Q?"}
    prims = _passages_app()
    (prompt,) = render_prompts(prims, lambda p: values[p.var], FakeTokenizer(), True, {}).values()
    assert prompt == [
        Segment("<user>[1] (src)\n", kind="static"),
        Segment("Alpha.", kind="chunk", chunk_id="c1"),
        Segment("\n\n[2] (src)\n", kind="static"),
        Segment("Beta. ", kind="chunk", chunk_id="c2"),
        Segment("\nQ?</user><assistant>", kind="dynamic"),
    ]
    plain = render_prompts(prims, lambda p: values[p.var], FakeTokenizer(), True, {}, True)
    assert plain == {"ask.answer": to_text(prompt)}
    assert to_text(prompt) == "<user>[1] (src)\nAlpha.\n\n[2] (src)\nBeta. \nQ?</user><assistant>"


def test_a_template_that_changes_the_content_keeps_the_plain_text():
    """Stripping moves the text the markers would point into: no split, the same text."""
    values = {"passages": [*PIECES[:3], chunk_segment(Chunk("c2", "Beta. ", "s", 0, 6, 2))]}
    values["question"] = " "
    prims = _passages_app()
    prompts = render_prompts(prims, lambda p: values[p.var], StrippingTokenizer(), True, {})
    plain = "<user>[1] (src)\nAlpha.\n\n[2] (src)\nBeta.</user><assistant>"
    assert prompts == {"ask.answer": plain}


def test_ready_pieces_in_a_plain_template_stay_as_they_are():
    @cg.semantic_function
    def ask(passages: list[Segment]):
        """Read: {{passages}}
        {{gen answer}}"""

    @cg.app
    def app(passages: list[Segment]):
        return ask(passages=passages)

    prims = app.plan.nodes["ask"].primitives
    (prompt,) = render_prompts(prims, lambda p: PIECES, None, False, {}).values()
    assert prompt == [Segment("Read: ", kind="static"), *PIECES, Segment("\n", kind="static")]
