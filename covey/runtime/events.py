"""Events a running app emits, in the order they happen: what `Runtime.stream` yields.

Small frozen records so a server can turn each into one server-sent event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from covey.runtime.trace import Trace


@dataclass(frozen=True)
class NodeStarted:
    node: str
    kind: str
    time: float


@dataclass(frozen=True)
class NodeFinished:
    """`outputs` maps each output name of the node to its value."""

    node: str
    kind: str
    time: float
    outputs: dict[str, Any]


@dataclass(frozen=True)
class TokenDelta:
    """New text of an app output variable; `index` is the element of a fan-out, else None."""

    node: str
    var: str
    text: str
    index: int | None = None


@dataclass(frozen=True)
class RunFinished:
    """The last event of a successful run: the app's outputs and its trace."""

    outputs: dict[str, Any]
    trace: Trace


Event = NodeStarted | NodeFinished | TokenDelta | RunFinished
