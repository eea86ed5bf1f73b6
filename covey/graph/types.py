"""Type checks between connected nodes, done once when the app is defined."""

from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin

from covey.retrieval.documents import Chunk, SearchResult

# Variables of these types hold retrieved text: their template segments are "chunk" segments.
CHUNK_TYPES: tuple[type, ...] = (SearchResult, Chunk)


def type_name(t: Any) -> str:
    """A short readable name: `list[SearchResult]`, not `list[covey.retrieval...]`."""
    if t is Any:
        return "Any"
    if get_origin(t) is None and isinstance(t, type):
        return t.__name__
    origin, args = get_origin(t), get_args(t)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(type_name(a) for a in args)
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name


def _is_union(t: Any) -> bool:
    return get_origin(t) in (types.UnionType, typing.Union)


def compatible(src: Any, dst: Any) -> bool:
    """Whether a value of type `src` may flow into an input declared as `dst`."""
    if src is Any or dst is Any or src == dst:
        return True
    if _is_union(src):
        return all(compatible(a, dst) for a in get_args(src))
    if _is_union(dst):
        return any(compatible(src, a) for a in get_args(dst))
    so, do = get_origin(src) or src, get_origin(dst) or dst
    if not (isinstance(so, type) and isinstance(do, type) and issubclass(so, do)):
        return False
    sa, da = get_args(src), get_args(dst)
    if not sa or not da or len(sa) != len(da):
        return True  # a bare `list` says nothing about its items
    return all(compatible(a, b) for a, b in zip(sa, da))


def value_fits(value: Any, t: Any) -> bool:
    """A literal bound to an input: checked against the outer type only."""
    if t is Any:
        return True
    if _is_union(t):
        return any(value_fits(value, a) for a in get_args(t))
    outer = get_origin(t) or t
    return not isinstance(outer, type) or isinstance(value, outer)


def item_type(t: Any) -> Any:
    """The element type of `list[X]` (Any when unknown), None when `t` is not a list."""
    if t is Any:
        return Any
    outer = get_origin(t) or t
    if not (isinstance(outer, type) and issubclass(outer, list | tuple)):
        return None
    args = get_args(t)
    return args[0] if args else Any


def is_chunk_type(t: Any) -> bool:
    """Retrieved results or chunks, alone or in a list."""
    inner = item_type(t)
    base = inner if inner is not None else t
    return isinstance(base, type) and issubclass(base, CHUNK_TYPES)
