"""Type compatibility between connected nodes."""

from __future__ import annotations

from typing import Any

import pytest

from covey.graph.types import compatible, is_chunk_type, item_type, type_name, value_fits
from covey.retrieval.documents import Chunk, SearchResult


@pytest.mark.parametrize(
    "src, dst, ok",
    [
        (str, str, True),
        (str, Any, True),
        (Any, int, True),
        (bool, int, True),
        (int, str, False),
        (list[SearchResult], list[SearchResult], True),
        (list[SearchResult], list[str], False),
        (list[SearchResult], list, True),
        (list[str], str, False),
        (str, str | None, True),
        (str | None, str, False),
        (dict[str, int], dict[str, int], True),
    ],
)
def test_compatible(src, dst, ok):
    assert compatible(src, dst) is ok


def test_names_and_items():
    assert type_name(list[SearchResult] | None) == "list[SearchResult] | NoneType"
    assert item_type(list[str]) is str and item_type(str) is None and item_type(list) is Any
    assert is_chunk_type(list[SearchResult]) and is_chunk_type(Chunk) and not is_chunk_type(str)
    assert value_fits("x", str) and not value_fits(3, str) and value_fits([1], list[str])
