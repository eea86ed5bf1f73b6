"""`ServedApp`: what the server needs from an app to give it routes.

A plain `App` graph and the session-keeping chatbot both reach HTTP through this one shape:
a pydantic input model to validate request bodies against, a stream of runtime events
(`NodeStarted`, `NodeFinished`, `TokenDelta`, then `RunFinished` with the outputs and the
trace), and a description for `GET /apps/{name}`. The routes never special-case an app.
A served app that keeps state (the chatbot's sessions) may also have `async close()`,
which the server awaits on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from covey.runtime.events import Event


@runtime_checkable
class ServedApp(Protocol):
    name: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]

    def stream(self, inputs: BaseModel) -> AsyncIterator[Event]:
        """Run once on validated inputs; the last event is a `RunFinished` whose `outputs`
        validate against `output_model`. Closing the iterator cancels the run."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready: at least "explain" (the optimized plan as text) and "mermaid"."""
        ...
