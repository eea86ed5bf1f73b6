"""The asyncio executor that runs optimized plans against an in-process engine.

`Runtime(llm).run(app, **inputs)` returns the outputs; `stream(...)` yields node events and
token deltas; `run_traced(...)` adds the per-run `Trace`.
"""

from __future__ import annotations

from covey.runtime.background import BackgroundRuntime, default_runtime, set_default_runtime
from covey.runtime.events import (
    Event,
    NodeFinished,
    NodeStarted,
    PromptRendered,
    RunFinished,
    TokenDelta,
    drain,
)
from covey.runtime.executor import RunResult, Runtime
from covey.runtime.render import Context, render_prompts
from covey.runtime.trace import NodeTrace, RequestTrace, SearchTrace, Trace

__all__ = [
    "BackgroundRuntime",
    "Context",
    "Event",
    "NodeFinished",
    "NodeStarted",
    "NodeTrace",
    "PromptRendered",
    "RequestTrace",
    "RunFinished",
    "RunResult",
    "Runtime",
    "SearchTrace",
    "TokenDelta",
    "Trace",
    "default_runtime",
    "drain",
    "render_prompts",
    "set_default_runtime",
]
