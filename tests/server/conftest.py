"""A real covey server on 127.0.0.1 (covey.server.background_server: uvicorn on a thread),
on the real embedded model (float32, CPU) and a small real index (MiniLM embedder, faiss).

`live_server(...)` starts a server, or returns the one already started with the same
arguments, so the model loads once per session and each distinct configuration once.
Servers stop at the end of the session. The built-in apps are built with gens capped at
`max_tokens` (default 6) so every call stays short.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.engine_client import EngineStats
from covey.retrieval.chunker import ChunkerConfig
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.server.background_server import BackgroundServer
from covey.server.server_builder import build_state, builtin_apps
from covey.server.state import ServerSettings
from tests.apps.conftest import DOCS
from tests.retrieval.conftest import embedder, tokenizer  # noqa: F401  (session fixtures)
from tests.runtime.conftest import make_cpu_engine, real_llm  # noqa: F401

APP_MAX_TOKENS = 6
KV_CACHE_TOKENS = 16384


class LiveServer(BackgroundServer):
    """A background server with the tests' helpers (clients, engine stats, idle waits)."""

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 120)
        return httpx.AsyncClient(base_url=self.url, **kwargs)

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

    def answering(self) -> int:
        """Requests the engine is answering (a first token out), read on the server's loop:
        a client that should leave mid-generation waits for this, not for a fixed time."""

        async def count() -> int:
            running = self.state.engine.engine.scheduler.running
            return sum(1 for seq in running if seq.num_output_tokens)

        return self.call(count())

    async def until_answering(self, call: asyncio.Future[Any], timeout: float = 60) -> None:
        """Wait (on the caller's loop) until the engine answers a request, while the client's
        `call` that sent it is still waiting for its reply."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.answering):
            assert not call.done(), call.result()
            assert time.monotonic() < deadline, "the request never reached the engine"
            await asyncio.sleep(0.02)

    def wait_released(self, timeout: float = 10) -> int:
        """The requests holding admission slots once none does (or the last count seen).
        A request gives its slot back when its handler returns, a few event-loop turns
        after the engine has dropped it, so an idle engine does not mean a free slot."""
        deadline = time.monotonic() + timeout
        while self.state.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.state.admission.in_flight


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


class Deployed(Exception):
    """Raised by `captured_deploys` where Ray Serve would have deployed: a test reads the
    specs start_ray_engine handed over, with no cluster."""


@pytest.fixture
def captured_deploys(monkeypatch) -> dict:
    """start_ray_engine against a stand-in cluster of 4 CPUs: the replica specs it deploys
    land in the returned dict, and the deploy raises `Deployed`."""
    from covey.server import ray_cluster, ray_deployment

    deployed: dict = {}

    def deploy_specs(specs):
        deployed.update(specs)
        raise Deployed

    monkeypatch.setattr(ray_cluster, "init_ray", lambda address=None: False)
    monkeypatch.setattr(ray_cluster, "cluster_cpus", lambda: 4.0)
    monkeypatch.setattr(ray_cluster, "deploy_specs", deploy_specs)  # the pooled deployment
    monkeypatch.setattr(ray_deployment, "deploy_specs", deploy_specs)  # via deploy_replicas
    monkeypatch.setattr(ray_cluster, "_teardown_quietly", lambda names, started: None)
    return deployed
