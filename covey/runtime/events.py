"""Events a running app emits, in the order they happen: what `Runtime.stream` yields.

Small frozen records so a server can turn each into one server-sent event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from covey.errors import RuntimeExecutionError
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
class PromptRendered:
    """Only in runs started with `record_prompts=True`: the exact prompt text of one LLM
    request, just before it goes to the engine (also kept in the trace's `RequestTrace`)."""

    node: str
    var: str
    prompt: str
    index: int | None = None


@dataclass(frozen=True)
class RunFinished:
    """The last event of a successful run: the app's outputs and its trace."""

    outputs: dict[str, Any]
    trace: Trace


Event = NodeStarted | NodeFinished | TokenDelta | PromptRendered | RunFinished


async def drain(
    events: AsyncIterator[Event], on_event: Callable[[Event], None] | None = None
) -> RunFinished:
    """Consume a run's events to the end and return its `RunFinished`; `on_event` sees each
    event on the way (to relay tokens). A run's error propagates from here."""
    finished: RunFinished | None = None
    async for event in events:
        if on_event is not None:
            on_event(event)
        if isinstance(event, RunFinished):
            finished = event
    if finished is None:
        raise RuntimeExecutionError("the run ended without a result")
    return finished
