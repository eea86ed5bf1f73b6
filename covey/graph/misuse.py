"""Errors for Python control flow on a semantic variable while an app is being defined.

An app function runs once, when the app is defined, and a semantic variable has no value
then: `if category == "hardware":` would compare a placeholder with a string, be always
False, and silently bake the else branch into the graph. So every Python operation that
needs a concrete value (`bool()`, `==` against a value, iteration, `len`, `in`, ordering,
f-strings, `+`) raises a `GraphError` that names the covey construct doing it at run time
instead: `cg.route` to branch, `cg.loop` to repeat, `cg.map` to iterate, a
`@cg.function` to compute, a template `{{placeholder}}` to format.
"""

from __future__ import annotations

from typing import Any

from covey.errors import GraphError

# Values a semantic variable is compared with by mistake (`var == "x"`); anything else
# (another IR object) compares by identity as usual.
PLAIN_VALUES = (str, bytes, int, float, bool, type(None), list, tuple, dict, set, frozenset)

_ROUTE = "cg.route({var}, {{value: branch_fn, ...}}, default=other_fn)"
_HINTS = {
    "bool": (
        "used as a truth value (if / while / and / or / not / bool())",
        f"to branch on it use {_ROUTE}; to repeat while a condition holds use "
        "cg.loop(body, until=predicate, max_iters=N)",
    ),
    "eq": (
        "compared with a value (==, !=)",
        f"to branch on its value use {_ROUTE}; to compute a bool at run time use a "
        "@cg.function and route on its result",
    ),
    "order": (
        "ordered against a value (<, <=, >, >=)",
        "compute the comparison at run time in a @cg.function and route on its result "
        f"with {_ROUTE}",
    ),
    "iter": (
        "iterated over (for / list() / unpacking)",
        "use cg.map(node, over={var}) to run a node per element, or a @cg.function over "
        "the whole list",
    ),
    "len": ("passed to len()", "compute it in a @cg.function that takes the list"),
    "contains": ("tested with `in`", "test it in a @cg.function and route on its result"),
    "index": ("indexed or sliced", "pick the element in a @cg.function"),
    "format": (
        "formatted into a string (f-string / format())",
        "put {{{{{short}}}}} in a semantic function's template, or build the string in a "
        "@cg.function",
    ),
    "add": (
        "used with + at definition time",
        "build the value in a @cg.function, or join text in a semantic function's template",
    ),
}


def misuse(var: Any, what: str) -> GraphError:
    """The error for using `var` (a Var) as a concrete value; `what` is a key of _HINTS."""
    did, instead = _HINTS[what]
    app = f"app {var.app!r}: " if var.app else ""
    short = var.output or var.name
    return GraphError(
        f"{app}semantic variable {var.name!r} was {did} while the app is being defined, but "
        "it has no value until the app runs; "
        + instead.format(var=var.name, short=short)
    )
