from __future__ import annotations

from covey.apps.citations import (
    Citation,
    all_citations,
    cited_numbers,
    format_passages,
    parse_citations,
    passage_segments,
    snippet,
)
from covey.llm_backend.segments import Segment

from .fakes import hit

RESULTS = [hit("Loops\n  iterate.", "pydoc:for"), hit("Context managers.", "pydoc:with")]


def test_passages_are_numbered_from_one_under_a_label_line_each():
    assert (
        format_passages(RESULTS)
        == "[1] (pydoc:for)\nLoops\n  iterate.\n\n[2] (pydoc:with)\nContext managers."
    )
    assert format_passages([]) == "" and passage_segments([]) == []


def test_passages_are_chunk_segments_between_small_label_segments():
    first, second = (r.chunk for r in RESULTS)
    assert passage_segments(RESULTS) == [
        Segment("[1] (pydoc:for)\n", kind="static"),
        Segment(first.text, kind="chunk", chunk_id=first.id),
        Segment("\n\n[2] (pydoc:with)\n", kind="static"),
        Segment(second.text, kind="chunk", chunk_id=second.id),
    ]


def test_cited_numbers_in_first_mention_order_each_once():
    assert cited_numbers("See [2], also [1][2] and [2, 1].", 2) == [2, 1]
    assert cited_numbers("No citations here.", 2) == []


def test_out_of_range_brackets_and_code_are_not_citations():
    assert cited_numbers("x = [1, 2, 3] per [3] and [0]", 2) == []
    assert cited_numbers("use `a[1]` or\n```python\nb[2]\n``` as in [2]", 2) == [2]
    assert cited_numbers("as [1] shows:\n```python\nitems[2]", 2) == [1]  # unclosed fence


def test_parse_maps_numbers_to_chunks():
    (cite,) = parse_citations("Use a with statement [2].", RESULTS)
    chunk = RESULTS[1].chunk
    assert cite == Citation(2, chunk.id, "pydoc:with", "Context managers.")


def test_all_citations_is_the_fallback_list():
    assert [c.number for c in all_citations(RESULTS)] == [1, 2]
    assert parse_citations("nothing cited", RESULTS) == ()


def test_snippet_cuts_at_a_word_with_an_ellipsis():
    assert snippet("one two three", limit=9) == "one two..."
    assert snippet("short", limit=9) == "short"
    assert snippet("abcdefghijkl", limit=5) == "abcde..."
