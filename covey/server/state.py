"""What every route shares: settings, the engine, the runtime, the served apps, readiness.

One `ServerState` per server process. The engine and runtime live on uvicorn's event loop
(covey's CPU engine computes on the loop thread between requests), so routes await them
directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from covey.llm_backend.engine_client import EngineClient
from covey.runtime.executor import Runtime
from covey.server.served_app import ServedApp

if TYPE_CHECKING:
    from covey.server.metrics import ServerMetrics


@dataclass(frozen=True)
class ServerSettings:
    """Limits a caller cannot exceed, and how the server is reached."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # bearer token; None: no auth
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024  # the most output tokens one request may ask for
    max_in_flight: int = 64  # requests running at once; past it, 429 with Retry-After
    max_batch: int = 32  # inputs in one /batch call
    session_idle_s: float = 600.0  # a chat session's pinned history is released after this


@dataclass
class ServerState:
    settings: ServerSettings = field(default_factory=ServerSettings)
    engine: EngineClient | None = None
    runtime: Runtime | None = None
    apps: dict[str, ServedApp] = field(default_factory=dict)
    metrics: ServerMetrics | None = None
    ready: bool = False  # the model and the index are loaded
    extras: dict[str, Any] = field(default_factory=dict)  # per-feature state (sessions, ...)
