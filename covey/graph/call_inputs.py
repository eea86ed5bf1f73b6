"""Call-time inputs: bind a call's arguments to an app's declared inputs and check their types.

Tracing checks how nodes are wired, but the values a caller passes exist only at call time:
without a check, `app(text=42)` for a `text: str` input runs anyway and the model reads "42".
So every call binds its arguments like a Python function would (positional ones in declared
order, then keywords) and validates each value against its declared type with a pydantic
`TypeAdapter`, before any node starts. Validation is pydantic's lax mode, the same the server
applies to JSON bodies, and the validated value is what the run sees (a tuple given for a
`list[str]` input arrives as a list). A type pydantic cannot describe is checked with
`isinstance` on its outer type. Every mistake is one `AppInputError` naming the app, the
input, the expected type and what was received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from covey.errors import AppInputError
from covey.graph.template import suggest
from covey.graph.types import type_name, value_fits

# Keyword arguments of a run that are options, not inputs: an app input cannot take these names.
RUN_OPTIONS = ("record_prompts",)
_PREVIEW = 40
_adapters: dict[Any, TypeAdapter[Any] | None] = {}


def _adapter(t: Any) -> TypeAdapter[Any] | None:
    """A cached adapter for `t`; None when pydantic cannot validate it at all."""
    try:
        return _adapters[t]
    except KeyError:
        pass
    except TypeError:  # an unhashable type annotation: build it each time
        return _build(t)
    _adapters[t] = adapter = _build(t)
    return adapter


def _build(t: Any) -> TypeAdapter[Any] | None:
    try:
        return TypeAdapter(t)
    except Exception:
        pass
    try:  # a user's own class somewhere inside: pydantic checks it with isinstance
        return TypeAdapter(t, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:
        return None


def _received(value: Any) -> str:
    text = repr(value)
    if len(text) > _PREVIEW:
        text = text[: _PREVIEW - 3] + "..."
    return f"{type(value).__name__} ({text})"


def _why(exc: ValidationError) -> str:
    """pydantic's first complaint, with where inside the value it is (`item 2`)."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{'at ' + where + ': ' if where else ''}{first['msg']}"


def check_input(app: str, name: str, declared: Any, value: Any) -> Any:
    """`value` validated against `declared` (converted where pydantic's lax mode converts)."""
    adapter = _adapter(declared)
    if adapter is None:
        if value_fits(value, declared):
            return value
        why = ""
    else:
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            why = f": {_why(exc)}"
    raise AppInputError(
        f"app {app!r}: input {name!r} expects {type_name(declared)}, got {_received(value)}"
        f"{why}"
    )


def bind_inputs(
    app: str,
    declared: Mapping[str, Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The call's inputs by name, validated: `args` fill the declared inputs in order, and
    an input given neither way takes its entry in `defaults`, if any."""
    names = list(declared)
    listing = ", ".join(f"{n}: {type_name(t)}" for n, t in declared.items()) or "none"
    if len(args) > len(names):
        raise AppInputError(
            f"app {app!r} takes {len(names)} input(s) ({listing}) but {len(args)} were given "
            "positionally"
        )
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in values:
            raise AppInputError(
                f"app {app!r}: input {name!r} given twice, positionally and by keyword"
            )
        if name not in declared:
            hint = suggest(name, names)
            if name in RUN_OPTIONS:
                hint = f"; {name}= is an option of app.run_traced() and app.stream()"
            raise AppInputError(f"app {app!r}: unknown input {name!r}{hint} (inputs: {listing})")
        values[name] = value
    for name, value in (defaults or {}).items():
        values.setdefault(name, value)
    missing = [n for n in names if n not in values]
    if missing:
        raise AppInputError(
            f"app {app!r}: missing input(s) {', '.join(map(repr, missing))} (inputs: {listing})"
        )
    return {n: check_input(app, n, declared[n], values[n]) for n in names}
