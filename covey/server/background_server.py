"""A covey server on a background thread of the calling process.

`covey serve` is the way to run a server; this is for a notebook or a script that already
holds its engine and apps and wants the HTTP API (the OpenAI-compatible routes, the apps'
REST endpoints, the chat page) beside them, and for tests that need a real server on
127.0.0.1. The socket is bound before uvicorn starts, so `port=0` gets a free port with no
race, and the constructor returns once `/healthz` answers.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

import httpx
import uvicorn

from covey.errors import ConfigError, CoveyError
from covey.server.app_factory import create_app
from covey.server.state import ServerState

START_TIMEOUT_S = 60.0


class BackgroundServer:
    """uvicorn serving `state` on its own thread and event loop (where the engine's
    coroutines then run); `stop()` or leaving a `with` block shuts it down."""

    def __init__(
        self,
        state: ServerState,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = START_TIMEOUT_S,
        log_level: str = "warning",
    ) -> None:
        self.state = state
        self.app = create_app(state)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(self.app, log_level=log_level, loop="asyncio")
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name=f"covey-{self.port}", daemon=True)
        self.thread.start()
        self._wait_started(start_timeout_s)

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])

        asyncio.run(serve())

    def _wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise CoveyError(f"the server on port {self.port} exited while starting")
            if self.server.started:
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise CoveyError(f"the server on port {self.port} did not start in {timeout_s:g}s")

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run `coro` on the server's event loop (where its engine lives) and wait."""
        if self.loop is None:
            raise CoveyError("the server is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
