"""Mermaid and DOT export, and the content of `explain()`."""

from __future__ import annotations

import re

import covey.graph as cg
from covey.graph.passes import PASSES
from tests.graph import shapes


def test_mermaid_lists_nodes_edges_inputs_and_outputs():
    text = shapes.linear().to_mermaid()
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    assert '    n_retrieve[("retrieve: retrieve p0")]' in lines
    assert '    n_rewrite -->|"rewrite.query"| n_retrieve' in lines
    assert '    n_in_question -->|"question: str"| n_answer' in lines
    assert '    n_answer -->|"answer"| n_out_answer' in lines


def test_mermaid_shapes_map_nodes():
    assert '    n_map_summarize[/"map_summarize: map p2"/]' in shapes.map_reduce().to_mermaid()


def test_dot_is_balanced_and_quoted():
    text = shapes.merge().to_dot()
    assert text.startswith('digraph "verdict" {') and text.rstrip().endswith("}")
    assert '    "argue_for" -> "judge" [label="argue_for.argument"];' in text
    assert '    "judge" -> "out:verdict" [label="verdict"];' in text
    assert text.count("[") == text.count("]")
    nodes = set(re.findall(r'^    "([^"]+)" \[label=', text, re.M))
    assert nodes == {"argue_for", "argue_against", "judge"}


def test_explain_says_what_the_runtime_and_engine_do():
    text = shapes.merge().explain()
    assert text.startswith("EXPLAIN app 'verdict'")
    assert "  argue_for [llm]: at start" in text
    assert "  judge [llm]: after argue_against, argue_for" in text
    assert "  argue_against: priority 1, sent with argue_for" in text
    assert "    prefill-ahead pins its first 1 static segment(s) once per app" in text
    assert (
        "    prefill-ahead, while it waits for argue_against, argue_for: its leading known "
        "segments (1 at run start), more as upstream outputs arrive"
    ) in text
    assert "  P1: argue_against, argue_for share 2 segment(s): prefill[static" in text
    assert "in-batch prefix wait prefills the common blocks once" in text
    assert "    decode(judge.verdict, max_tokens=256 choices=for|against)" in text
    assert "    - argue_against: priority 1 (slack: off the critical path)" in text
    assert "    - critical path: argue_for -> judge" in text
    for name in ("prefill_decomposition", "objective_deduction"):
        assert f"  {name}: fired" in text
    assert "  prune_unused: no change" in text


def test_explain_says_when_a_prefix_is_shared_only_through_the_cache():
    @cg.semantic_function
    def tagged(text: str):
        """{{#system}}
        You are a helpful assistant for the Python docs; answer in one line.
        {{#user}}
        {{text}}
        {{#assistant}}
        {{gen out}}"""

    @cg.app
    def later(q: str):
        return {"a": tagged(q), "b": tagged(shapes.title(q))}

    text = later.explain()
    assert "  P1: tagged, tagged_2 share 1 segment(s)" in text
    assert "sent at different times: later ones reuse it only from the engine's prefix cache" in (
        text
    )
    expected = "all pinned static text: every call finds it cached unless requests needed the room"
    assert expected in text


def test_explain_for_other_awaited_outputs_and_no_prefixes():
    text = shapes.two_outputs().explain(awaited=["title"])
    assert "(awaited: title)" in text
    assert "  answer: priority 3\n" in text
    assert "    - answer: priority 3 (background: feeds only outputs nobody awaits)" in text
    assert "shared prefixes: none" in text


def test_explain_says_whether_retrieval_overrides_the_retrievers_settings():
    own = shapes.two_outputs().explain()
    assert "retrieve [retrieve]: at start; index 'default', the retriever's own k, " in own
    assert "the retriever's own mode" in own

    @cg.app
    def exact(q: str):
        return cg.retrieve(q, k=3, mode="bm25", index="docs")

    text = exact.explain()
    assert (
        "  retrieve [retrieve]: at start; index 'docs', k=3 (overrides the retriever's), "
        "mode=bm25 (overrides the retriever's)"
    ) in text
    assert text.count("llm calls") == 0


def test_plan_records_every_pass_in_order():
    plan = shapes.linear().plan
    assert [r.name for r in plan.passes] == [p.__name__ for p in PASSES]
    assert plan.nodes["answer"].deps == ("retrieve",)
    assert [n.name for n in plan.llm_calls()] == ["rewrite", "answer"]


def test_same_app_same_plan():
    assert shapes.merge().plan == shapes.merge().plan


def test_a_plan_without_optional_passes_keeps_naive_choices():
    plan = shapes.merge().optimize(passes=(PASSES[0],))
    assert [r.name for r in plan.passes] == ["prune_unused"]
    judge = plan.nodes["judge"]
    assert (judge.priority, judge.deps) == (0, ("argue_against", "argue_for"))
    assert not any(p.pin for p in judge.primitives)
    assert [p.op for p in judge.primitives][-1] == "decode"
    text = plan.explain()
    # The engine shares prompt starts whatever the passes decided, so explain() still says so.
    assert "  P1: argue_against, argue_for share 2 segment(s): prefill[static](" in text
    assert "in-batch prefix wait prefills the common blocks once" in text
    assert "pins" not in text and "pinned" not in text
