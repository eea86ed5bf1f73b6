from __future__ import annotations

import pytest

from covey.apps.advanced_rag import (
    build_advanced_rag_app,
    clean_query,
    fuse_rankings,
    fusion_node,
)
from covey.errors import ConfigError, InvalidRequestError
from covey.graph.shared_prefixes import shared_prefixes

from .fakes import hit

A, B, C, D = (hit(t, score=9.0) for t in ("a", "b", "c", "d"))


def _texts(results):
    return [r.chunk.text for r in results]


def test_a_chunk_found_by_several_queries_rises():
    fused = fuse_rankings([[A, B, C], [D, C], [C, B]], k=4)
    assert _texts(fused) == ["c", "b", "a", "d"]  # a and d tie: first seen first
    assert fused[0].score == pytest.approx(1 / 63 + 1 / 62 + 1 / 61)


def test_fusion_dedupes_by_chunk_id_and_keeps_top_k():
    fused = fuse_rankings([[A, A, B], [A]], k=1)
    assert _texts(fused) == ["a"] and len({r.chunk.id for r in fuse_rankings([[A], [A]], 5)}) == 1


def test_ties_keep_first_seen_order():
    assert _texts(fuse_rankings([[A], [B], [C]], k=3)) == ["a", "b", "c"]
    assert fuse_rankings([], k=3) == [] and fuse_rankings([[], []], k=3) == []
    with pytest.raises(InvalidRequestError, match="k must be a positive integer, got 0"):
        fuse_rankings([[A]], k=0)


def test_fusion_node_takes_one_named_input_per_ranking():
    node = fusion_node(3, k=2)
    assert list(node.op.inputs) == ["ranking_1", "ranking_2", "ranking_3"]
    assert _texts(node.op.fn(ranking_1=[A], ranking_2=[B, A], ranking_3=[])) == ["a", "b"]


@pytest.mark.parametrize(
    ("rewritten", "expected"),
    [
        ("python for loop list\nmore", "python for loop list"),
        ('\n  "with statement close file"', "with statement close file"),
        ("Query: dict get default", "dict get default"),
        ("Search query: `KeyError`", "KeyError"),
        ("  \n", "the question"),
        ("Query:", "the question"),
    ],
)
def test_clean_query_keeps_one_usable_line(rewritten, expected):
    assert clean_query(rewritten, "the question") == expected


def test_app_shape_follows_its_parameters():
    app = build_advanced_rag_app(angles=("one", "two"), include_question=False)
    assert set(app.outputs) == {"answer", "results", "query_1", "query_2"}
    assert sum(n.kind == "retrieve" for n in app.plan.nodes.values()) == 2
    (group,) = shared_prefixes(app.plan)  # the rewrites share their leading instruction
    assert set(group.nodes) == {"rewrite_query", "rewrite_query_2"}
    with pytest.raises(ConfigError, match="angles must name at least one rewrite"):
        build_advanced_rag_app(angles=())
    with pytest.raises(ConfigError, match="top_k: k must be a positive integer, got -1"):
        build_advanced_rag_app(top_k=-1)
