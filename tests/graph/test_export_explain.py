"""Mermaid and DOT export, and the content of `explain()`."""

from __future__ import annotations

import re

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


def test_explain_shows_stages_prefixes_priorities_and_passes():
    text = shapes.merge().explain()
    assert text.startswith("EXPLAIN app 'verdict'")
    assert "  0: argue_against [llm], argue_for [llm]  (parallel)" in text
    assert "  argue_against: priority 1 (slack), stage 0  batch S0, prefix P1" in text
    assert "  judge: priority 0 (latency, critical path), stage 1" in text
    assert "  P1: argue_against, argue_for share 2 segment(s): prefill[static" in text
    assert "    decode(judge.verdict, max_tokens=256 choices=for|against)" in text
    for name in ("prune_and_parallelize", "prefix_sharing", "prefill_decomposition"):
        assert f"  {name}: fired" in text


def test_explain_for_other_awaited_outputs_and_no_prefixes():
    text = shapes.two_outputs().explain(awaited=["title"])
    assert "(awaited: title)" in text
    assert "  answer: priority 3 (background), stage 1" in text
    assert "shared prefixes: none" in text


def test_plan_records_every_pass_in_order():
    plan = shapes.linear().plan
    assert [r.name for r in plan.passes] == [p.__name__ for p in PASSES]
    assert plan.nodes["answer"].deps == ("retrieve",)
    assert [n.name for n in plan.llm_calls()] == ["rewrite", "answer"]


def test_same_app_same_plan():
    assert shapes.merge().plan == shapes.merge().plan


def test_a_plan_without_optional_passes_keeps_naive_choices():
    plan = shapes.merge().optimize(passes=(PASSES[0],))
    assert [r.name for r in plan.passes] == ["prune_and_parallelize"]
    assert plan.prefix_groups == () and plan.nodes["argue_for"].prefix_groups == ()
    judge = plan.nodes["judge"]
    assert (judge.priority, judge.objective, judge.stage) == (0, "latency", 1)
    assert not any(p.early or p.pin for p in judge.primitives)
    assert [p.op for p in judge.primitives][-1] == "decode"
    assert "shared prefixes: none" in plan.explain()
