"""A real covey server on 127.0.0.1: uvicorn in a background thread around `create_app`,
on the real embedded model (float32, CPU) and a small real index (MiniLM embedder, faiss).

`live_server(...)` starts a server, or returns the one already started with the same
arguments, so the model loads once per session and each distinct configuration once.
Servers stop at the end of the session. The built-in apps are built with gens capped at
`max_tokens` (default 6) so every call stays short.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
import uvicorn

from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.engine_client import EngineStats
from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.server.app_factory import create_app
from covey.server.server_builder import build_state, builtin_apps
from covey.server.state import ServerSettings, ServerState
from tests.apps.conftest import DOCS
from tests.retrieval.conftest import embedder, tokenizer  # noqa: F401  (session fixtures)
from tests.runtime.conftest import make_cpu_engine, real_llm  # noqa: F401

APP_MAX_TOKENS = 6
KV_CACHE_TOKENS = 16384
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """One uvicorn server on its own thread and event loop; `state` is what it serves."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.app = create_app(state)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", loop="asyncio"
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        self._wait_started()

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(serve())

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError(f"the test server on port {self.port} exited at start")
            if self.server.started:
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"the test server on port {self.port} did not start")

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 120)
        return httpx.AsyncClient(base_url=self.url, **kwargs)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run `coro` on the server's event loop (where its engine lives) and wait."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> EngineStats:
        return self.call(self.state.engine.stats())

    def wait_idle(self, timeout: float = 30) -> EngineStats:
        """The engine's stats once no request holds KV or waits (or the last seen)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = not (stats.kv_blocks_used or stats.num_running or stats.num_waiting)
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server_index(tmp_path_factory, embedder, tokenizer):  # noqa: F811
    """The apps tests' five Python-docs-like documents, in a real index."""
    index = DocumentIndex.create(
        tmp_path_factory.mktemp("server") / "pydocs",
        embedder=embedder,
        tokenizer=tokenizer,
        chunker=ChunkerConfig(chunk_tokens=64, overlap_tokens=8),
    )
    index.add_documents([Document(text, source) for source, text in DOCS.items()])
    return index


@pytest.fixture(scope="session")
def live_server(server_index):
    """`live_server(settings=None, max_tokens=6, kv_cache_tokens=16384, sessions=True)`:
    a started `LiveServer` serving the built-in apps (one per distinct argument set)."""
    servers: dict[tuple, LiveServer] = {}

    def start(
        settings: ServerSettings | None = None,
        max_tokens: int = APP_MAX_TOKENS,
        kv_cache_tokens: int = KV_CACHE_TOKENS,
        sessions: bool = True,
    ) -> LiveServer:
        settings = settings or ServerSettings()
        key = (settings, max_tokens, kv_cache_tokens, sessions)
        if key not in servers:
            engine = AsyncLLM(engine=make_cpu_engine(kv_cache_tokens=kv_cache_tokens))
            state = build_state(
                engine,
                server_index,
                settings,
                builtin_apps(max_tokens, server_index),
                sessions=sessions,
            )
            servers[key] = LiveServer(state)
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()
