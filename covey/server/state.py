"""What every route shares: settings, the engine, the runtime, the served apps, readiness.

One `ServerState` per server process. The engine and runtime live on uvicorn's event loop
(covey's CPU engine computes on the loop thread between requests), so routes await them
directly. Every route that needs the engine asks `require_ready()` first: while the model
and index load (`covey serve` answers health checks meanwhile) it answers 503.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from covey.errors import EngineUnavailableError
from covey.llm_backend.engine_client import EngineClient
from covey.runtime.executor import Runtime
from covey.server.admission import Admission
from covey.server.metrics import ServerMetrics
from covey.server.served_app import ServedApp

if TYPE_CHECKING:
    from covey.server.errors import ErrorShape


@dataclass(frozen=True)
class ServerSettings:
    """Limits a caller cannot exceed, and how the server is reached."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # bearer token; None: no auth (COVEY_API_KEY may set one)
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024  # the most output tokens one request may ask for
    max_in_flight: int = 64  # requests running at once; past it, 429 with Retry-After
    max_batch: int = 32  # inputs in one /batch call
    session_idle_s: float = 600.0  # a chat session's pinned history is released after this

    @property
    def max_fan_out(self) -> int:
        """The most engine requests one call may ask for at once (a batch's inputs, `n`
        choices): past the admission bound no retry could ever admit it, so it is the
        caller's mistake (422), not a full server (429)."""
        return min(self.max_batch, self.max_in_flight)


@dataclass
class ServerState:
    settings: ServerSettings = field(default_factory=ServerSettings)
    engine: EngineClient | None = None
    runtime: Runtime | None = None
    apps: dict[str, ServedApp] = field(default_factory=dict)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    ready: bool = False  # the model and the index are loaded
    admission: Admission = field(init=False)  # the settings' max_in_flight bound
    api_key: str | None = None  # the key callers must send (settings or environment)
    # Path prefix -> the error body of that route family (OpenAI's shape for /v1).
    error_shapes: dict[str, ErrorShape] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_in_flight)

    def require_ready(self) -> EngineClient:
        """The engine, or `EngineUnavailableError` (503) while the model and index load."""
        if not self.ready or self.engine is None:
            raise EngineUnavailableError("not ready: the model and index are still loading")
        return self.engine
