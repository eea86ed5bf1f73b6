"""`RemoteEngine` against a live covey server (real uvicorn, real embedded model): an app
runs through it exactly as its text prompts run on the engine directly, the server's prefix
cache shows through `usage`, aborts free the server's KV, and what needs KV access is
refused and listed by `explain()` (also in a server's GET /apps/{name}), and a failure
mid-stream keeps its error category."""

from __future__ import annotations

import asyncio

import pytest

from covey.errors import (
    ConfigError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    NotSupportedError,
)
from covey.llm_backend.remote_engine import RemoteEngine
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import Runtime, render_prompts
from covey.server.server_builder import build_state, builtin_apps
from tests.retrieval.conftest import embedder, tokenizer  # noqa: F401  (session fixtures)
from tests.runtime.conftest import make_cpu_engine
from tests.runtime.test_real_model import GREEDY, naming  # the same two-node app
from tests.server.conftest import LiveServer, live_server, server_index  # noqa: F401


@pytest.fixture(scope="module")
def server(live_server):  # noqa: F811
    return live_server()


async def test_an_app_runs_through_the_remote_engine(server):
    async with RemoteEngine(server.url) as remote:
        await remote.connect()
        assert remote.model_name == server.state.engine.model_name
        assert remote.tokenizer is not None  # the served model is known here: its template
        runtime = Runtime(remote)
        result = await runtime.run_traced(naming, thing="a red bicycle")
        again = await runtime.run_traced(naming, thing="a red bicycle")
        plan_text = runtime.explain(naming)

    name, text = result.outputs["name"], result.outputs["text"]
    plan = naming.plan
    first = render_prompts(
        plan.nodes["name_it"].primitives, lambda p: "a red bicycle", None, False, {}, True
    )
    second = render_prompts(
        plan.nodes["describe"].primitives, lambda p: name, remote.tokenizer, True, {}
    )
    direct = make_cpu_engine(enable_prefix_caching=False)
    name_params = plan.nodes["name_it"].primitives[-1].params
    expected = []
    for i, (prompt, params) in enumerate(
        [(first["name_it.name"], name_params), (second["describe.text"], GREEDY)]
    ):
        (final,) = direct.run_to_completion([direct.add_request(prompt, params, str(i))])
        expected.append((final.text, final.metrics.num_prompt_tokens))
    assert (name, text) == (expected[0][0], expected[1][0])

    requests = [result.trace.nodes[n].requests[0] for n in ("name_it", "describe")]
    assert [r.prompt_tokens for r in requests] == [n for _, n in expected]  # from `usage`
    assert again.outputs == result.outputs
    assert again.trace.cached_tokens > 0  # the server's prefix cache, seen through `usage`

    assert "prefill: off" in plan_text and "segments: off" in plan_text
    assert f"engine {remote.model_name}, features off:" in plan_text


async def test_what_needs_kv_access_is_refused(server):
    async with RemoteEngine(server.url) as remote:
        caps = remote.capabilities
        assert not (caps.prefill or caps.pause or caps.segments or caps.chunks or caps.choices)
        for call in (
            remote.prefill("hello", pin="p"),
            remote.pause("x"),
            remote.resume("x", "more"),
            remote.warm_chunks([]),
        ):
            with pytest.raises(NotSupportedError, match="KV cache"):
                await call
        assert await remote.pinned() == {} and await remote.unpin("p") is False
        with pytest.raises(NotSupportedError, match="choices"):
            async for _ in remote.generate("Pick:", SamplingParams(choices=("a", "b"))):
                pass


async def test_abort_frees_the_servers_kv(server):
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    async with RemoteEngine(server.url) as remote:
        outputs = []
        async for out in remote.generate("Count to a thousand:", params, request_id="long"):
            outputs.append(out)
            if len(outputs) == 2:
                assert (await remote.stats()).num_running == 1
                await remote.abort("long")
        assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
        assert len(outputs) == 3
    stats = await asyncio.to_thread(server.wait_idle, 5)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0


async def test_server_errors_map_onto_the_error_tree(server):
    async with RemoteEngine(server.url, model="no-such-model") as remote:
        with pytest.raises(ModelNotFoundError, match="no-such-model"):
            async for _ in remote.generate("hi", GREEDY):
                pass
    async with RemoteEngine(server.url) as remote:
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            async for _ in remote.generate("hi", SamplingParams(max_tokens=100_000)):
                pass
    async with RemoteEngine("http://127.0.0.1:9") as remote:  # nothing listens on port 9
        with pytest.raises(EngineUnavailableError, match="cannot reach"):
            await remote.connect()


async def _abort_running(server) -> None:
    """Abort, on the server's engine, every request it is generating."""
    engine = server.state.engine
    for rid in list(engine.engine.requests):
        await engine.abort(rid)


async def test_a_failure_after_the_stream_began_keeps_its_category(server):
    """The server aborts the request mid-stream: its `error` event says 503 (unavailable),
    which arrives as `EngineUnavailableError`, not a generic `EngineError`."""
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    async with RemoteEngine(server.url) as remote:
        with pytest.raises(EngineUnavailableError, match="aborted"):
            async for out in remote.generate("Count to a thousand:", params):
                if out.delta_text:
                    await asyncio.to_thread(server.call, _abort_running(server))
    stats = await asyncio.to_thread(server.wait_idle, 5)
    assert stats.kv_blocks_used == 0


def test_a_server_on_a_remote_engine_says_what_is_off(server, server_index):  # noqa: F811
    """`covey serve --remote`'s state: GET /apps/{name} explains the plan as the remote
    engine runs it, listing the features it turns off."""
    state = build_state(RemoteEngine(server.url), server_index, apps=builtin_apps(6))
    front = LiveServer(state)
    try:
        with front.client() as client:
            info = client.get("/apps/advanced_rag").json()
            chat = client.get("/apps/rag_chatbot").json()
    finally:
        front.stop()
    assert "features off:" in info["explain"] and "prefill: off" in info["explain"]
    assert "prefill: off" in chat["explain"] and chat["sessions"]["history_kv_pinned"] is False


@pytest.mark.parametrize("url", ["gpu-box:8000", "ftp://gpu-box", None])
def test_a_base_url_that_is_no_http_url_is_refused_by_name(url):
    with pytest.raises(ConfigError, match="base_url must be an http\\(s\\) URL, got"):
        RemoteEngine(url, tokenizer=None)
