"""The built-in RAG apps' prompts say they are about Python, which is true only of the default
index. Built over an index of the user's own (`covey chat --docs --index`, `covey serve
--index`), an app that told the model "Python" would bend every answer toward Python, so the
same template is reworded neutrally instead: same structure, same variables, no subject."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any


def reworded(fn: Callable[..., Any], wording: Mapping[str, str]) -> Callable[..., Any]:
    """A copy of template function `fn` whose docstring (its prompt) has each key of `wording`
    replaced by its value. A key missing from the template is a programming error caught at
    import, so an edited prompt cannot silently keep its old subject."""
    doc = fn.__doc__ or ""
    for old, new in wording.items():
        if old not in doc:
            raise ValueError(f"{fn.__name__}'s prompt no longer contains {old!r}")
        doc = doc.replace(old, new)
    copy = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__doc__ = doc
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    return copy
