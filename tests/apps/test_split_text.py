from __future__ import annotations

import pytest

from covey.apps.mapreduce_summary import build_summary_app, number_summaries, split_text
from covey.errors import ConfigError, InvalidRequestError

PARAGRAPHS = ["Alpha one. Alpha two.", "Beta one.", "Gamma one. Gamma two. Gamma three."]
TEXT = "\n\n".join(PARAGRAPHS)


def test_paragraphs_are_packed_in_order_up_to_the_budget():
    assert split_text(TEXT, max_chars=1000) == [TEXT]
    assert split_text(TEXT, max_chars=34) == [f"{PARAGRAPHS[0]}\n\nBeta one.", PARAGRAPHS[2]]


def test_a_long_paragraph_splits_at_sentences_then_words():
    assert split_text(PARAGRAPHS[2], max_chars=22) == ["Gamma one. Gamma two.", "Gamma three."]
    assert split_text("aaaa bbbb cccc", max_chars=9) == ["aaaa bbbb", "cccc"]
    assert split_text("abcdefghij", max_chars=4) == ["abcd", "efgh", "ij"]


def test_every_piece_fits_and_no_word_is_lost():
    text = " ".join(f"word{i}." if i % 7 == 0 else f"word{i}" for i in range(200))
    text += "\n\n  \n\n" + TEXT
    pieces = split_text(text, max_chars=50, max_pieces=100)
    assert all(0 < len(p) <= 50 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert split_text(text, max_chars=50, max_pieces=100) == pieces  # deterministic


def test_empty_or_too_many_pieces_are_refused():
    with pytest.raises(InvalidRequestError, match="text is empty; there is nothing to summarize"):
        split_text(" \n\n ")
    with pytest.raises(InvalidRequestError, match="text splits into 4 pieces .* max_pieces=2"):
        split_text(TEXT, max_chars=22, max_pieces=2)
    with pytest.raises(InvalidRequestError, match="max_chars must be positive"):
        split_text(TEXT, max_chars=0)
    with pytest.raises(ConfigError, match="piece_chars and max_pieces must be positive"):
        build_summary_app(piece_chars=0)


def test_partial_summaries_are_numbered_one_per_line():
    assert number_summaries(["First\npart.", " Second."]) == "1. First part.\n2. Second."
