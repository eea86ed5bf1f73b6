"""Callers' mistakes get 4xx (never 5xx), a failing app gets 500 naming its node while the
server keeps serving, the server holds many streams at once, refuses past its admission
bound with 429 + Retry-After, and a client that leaves mid-stream frees its KV at once."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import pytest

import covey.graph as cg
from covey.apps.mapreduce_summary import build_summary_app
from covey.errors import ConfigError
from covey.llm_backend.sampling_params import SamplingParams
from covey.server.graph_app import GraphServedApp
from covey.server.state import ServerSettings
from tests.server.sse import TEXT, parse_sse


@pytest.fixture(scope="module")
def server(live_server):
    return live_server()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


def _error(reply, status: int) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert {"type", "category", "message"} <= set(error)
    return error["message"]


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (json.dumps({"text": 5}).encode(), "text"),
        (json.dumps({}).encode(), "text: Field required"),
        (json.dumps({"text": "hi", "colour": "red"}).encode(), "colour"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"text": "a\\ud800b"}', "text: not valid Unicode"),  # a lone surrogate
        (b'{"text": "ok", "\\udc00": 1}', "not valid Unicode"),  # in a key
        (b"[" * 200_000, "not valid JSON"),  # nested past the parser's recursion limit
    ],
)
@pytest.mark.parametrize("route", ["invoke", "stream"])
def test_bad_bodies_get_422_naming_the_field(client, body, field, route):
    reply = client.post(f"/apps/mapreduce_summary/{route}", content=body)
    assert field in _error(reply, 422)


def test_bad_batch_bodies_get_422(client):
    url = "/apps/mapreduce_summary/batch"
    assert "not valid JSON" in _error(client.post(url, content=b"[" * 200_000), 422)
    body = b'{"inputs": [{"text": "fine"}, {"text": "\\ud800"}]}'
    assert "inputs.1.text: not valid Unicode" in _error(client.post(url, content=body), 422)


def test_unknown_apps_routes_and_methods_get_4xx(client):
    assert "mapreduce_summary" in _error(client.post("/apps/nope/invoke", json={}), 404)
    _error(client.get("/apps/nope"), 404)
    _error(client.post("/apps/nope/stream", json={}), 404)
    _error(client.get("/no/such/route"), 404)
    _error(client.get("/apps/mapreduce_summary/invoke"), 405)


def test_bodies_past_the_size_limit_get_413(server, client):
    limit = server.state.settings.max_body_bytes
    big = json.dumps({"text": "x" * (limit + 10)}).encode()
    assert "limit" in _error(client.post("/apps/mapreduce_summary/invoke", content=big), 413)

    def chunked():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    reply = client.post("/apps/mapreduce_summary/invoke", content=chunked())
    _error(reply, 413)
    # FastAPI parses /v1's bodies itself; the cut-off still answers 413, not its 400.
    reply = client.post("/v1/chat/completions", content=chunked())
    assert reply.status_code == 413, reply.text


def test_bad_batches_get_422(client):
    url = "/apps/mapreduce_summary/batch"
    assert "inputs" in _error(client.post(url, json={"inputs": "text"}), 422)
    _error(client.post(url, json={"inputs": []}), 422)
    too_many = [{"text": "a"}] * (ServerSettings().max_batch + 1)
    assert "at most" in _error(client.post(url, json={"inputs": too_many}), 422)
    reply = client.post(url, json={"inputs": [{"text": "a"}, {"text": 3}]})
    assert "inputs.1.text" in _error(reply, 422)


def test_an_invalid_value_caught_inside_a_node_is_the_callers_fault(client):
    message = _error(client.post("/apps/mapreduce_summary/invoke", json={"text": "   "}), 400)
    assert "split_text" in message and "empty" in message


def _explode(text: str) -> str:
    raise RuntimeError(f"cannot handle {text!r}")


@pytest.fixture(scope="module")
def exploding_app(server):
    explode = cg.function(_explode)

    @cg.app(name="explode")
    def explode_app(text: str):
        return {"out": explode(text=text)}

    server.state.apps["explode"] = GraphServedApp(explode_app, lambda: server.state.runtime)
    yield "explode"
    del server.state.apps["explode"]


def test_a_failing_node_is_a_500_naming_it_and_the_server_keeps_serving(
    server, client, exploding_app
):
    message = _error(client.post(f"/apps/{exploding_app}/invoke", json={"text": "x"}), 500)
    assert "_explode" in message
    with client.stream("POST", f"/apps/{exploding_app}/stream", json={"text": "x"}) as reply:
        assert reply.status_code == 200
        events = list(parse_sse(reply.iter_lines()))
    kind, data = events[-1]
    assert kind == "error" and "_explode" in data["error"]["message"]
    batch = client.post(f"/apps/{exploding_app}/batch", json={"inputs": [{"text": "x"}]})
    assert batch.status_code == 200 and batch.json()["results"][0]["status"] == 500
    assert client.get("/healthz").status_code == 200
    ok = client.post("/apps/mapreduce_summary/invoke", json={"text": TEXT})
    assert ok.status_code == 200, ok.text


def test_an_app_asking_more_tokens_than_the_limit_is_refused_at_registration():
    app = build_summary_app(summary_max_tokens=2000)
    with pytest.raises(ConfigError, match="combine_summaries.*2000.*1024"):
        GraphServedApp(app, lambda: None, max_tokens=1024)


async def test_32_concurrent_streams_all_complete(server):
    texts = [f"Note {i}: the with statement closes file number {i}." for i in range(32)]

    async def one(client, text):
        async with client.stream(
            "POST", "/apps/mapreduce_summary/stream", json={"text": text}
        ) as reply:
            assert reply.status_code == 200, await reply.aread()
            events = list(parse_sse([line async for line in reply.aiter_lines()]))
        return events

    async with server.async_client() as client:
        runs = await asyncio.gather(*(one(client, t) for t in texts))
    for events in runs:
        assert events[-1][0] == "result", events[-3:]
        assert events[-1][1]["outputs"]["summary"]
    assert server.wait_idle().kv_blocks_used == 0


def count_to(limit: str):
    """{{#user}}
    Write every number from 1 to {{limit}}, separated by commas.
    {{#assistant}}
    {{gen numbers}}"""


@pytest.fixture(scope="module")
def slow_server(live_server):
    """Four requests at most, and an app whose answer is long enough that a stream is
    still generating when its client leaves."""
    server = live_server(ServerSettings(max_in_flight=4), kv_cache_tokens=4096)
    # ignore_eos: a greedy answer that stops early would free its slot mid-test.
    counting = cg.semantic_function(
        count_to, params=SamplingParams(max_tokens=256, ignore_eos=True)
    )

    @cg.app(name="count")
    def count_app(limit: str):
        return {"numbers": counting(limit=limit)}

    server.state.apps["count"] = GraphServedApp(count_app, lambda: server.state.runtime)
    # Long enough (2000 tokens, >= 20 s on any CPU) that only an abort idles the engine
    # within the tests' 10 s windows.
    counting_long = cg.semantic_function(
        count_to, params=SamplingParams(max_tokens=2000, ignore_eos=True)
    )

    @cg.app(name="count_long")
    def count_long_app(limit: str):
        return {"numbers": counting_long(limit=limit)}

    server.state.apps["count_long"] = GraphServedApp(
        count_long_app, lambda: server.state.runtime
    )
    return server


async def _first_token(reply) -> AsyncIterator[str]:
    """Reads up to the first token event and returns the open line iterator. The caller
    must keep it: an abandoned async iterator is closed when collected, and that closes
    the connection, so the server would see its client leave at a time nobody chose."""
    lines = reply.aiter_lines()
    async for line in lines:
        if line.startswith("event: token"):
            return lines
    raise AssertionError("the stream ended before any token")


def test_more_than_the_server_ever_admits_is_422_not_429(slow_server):
    """A batch (or n) past max_in_flight could never be admitted: a retry would not help."""
    limit = slow_server.state.settings.max_in_flight
    with slow_server.client() as client:
        many = [{"limit": "2"}] * (limit + 1)
        message = _error(client.post("/apps/count/batch", json={"inputs": many}), 422)
        assert message.startswith("inputs:") and f"at most {limit}" in message
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        reply = client.post("/v1/chat/completions", json={**body, "n": limit + 1})
        assert reply.status_code == 422 and reply.json()["error"]["param"] == "n", reply.text
        assert slow_server.state.admission.in_flight == 0


async def test_an_invoke_client_that_leaves_frees_its_kv(slow_server):
    baseline = slow_server.wait_idle()
    assert baseline.kv_blocks_used == 0
    gone_before = await asyncio.to_thread(_gone, slow_server, "count_long")
    async with slow_server.async_client() as client:
        call = asyncio.ensure_future(
            client.post("/apps/count_long/invoke", json={"limit": "3000"})
        )
        # The client gives up mid-generation, once the engine is answering (a fixed client
        # timeout could as well fire before the request reached the engine).
        await slow_server.until_answering(call)
        call.cancel()  # closes its connection
        with pytest.raises(asyncio.CancelledError):
            await call
    stats = await asyncio.to_thread(slow_server.wait_idle, 10)
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert await asyncio.to_thread(slow_server.wait_released) == 0
    assert await asyncio.to_thread(_gone, slow_server, "count_long") == gone_before + 1


def _gone(server, app: str = "count") -> float:
    """How many requests to `app` the metrics record as clients that left."""
    with server.client() as client:
        text = client.get("/metrics").text
    found = re.search(rf'covey_requests_total\{{app="{app}",status="499"\}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


async def test_full_server_answers_429_and_leaving_clients_free_their_kv(slow_server):
    baseline = slow_server.wait_idle()
    assert baseline.kv_blocks_used == 0
    gone_before = await asyncio.to_thread(_gone, slow_server)
    async with slow_server.async_client() as client:
        streams = [
            client.stream("POST", "/apps/count/stream", json={"limit": str(500 + i)})
            for i in range(4)
        ]
        replies = [await s.__aenter__() for s in streams]
        readers = await asyncio.gather(*(_first_token(r) for r in replies))
        assert slow_server.stats().kv_blocks_used > 0  # mid-generation
        assert slow_server.state.admission.in_flight == 4
        full = await client.post("/apps/count/invoke", json={"limit": "3"})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1, full.text
        assert full.json()["error"]["category"] == "overloaded"
        left = time.monotonic()
        for stream in streams:  # the clients go away mid-stream
            await stream.__aexit__(None, None, None)
        del readers
    stats = slow_server.wait_idle(timeout=10)
    freed_in = time.monotonic() - left
    assert stats.kv_blocks_used == baseline.kv_blocks_used == 0
    assert stats.num_running == stats.num_waiting == 0
    # Every stream gives its slot back when its response closes, which can come a moment
    # after the engine has already dropped the aborted requests.
    assert await asyncio.to_thread(slow_server.wait_released) == 0
    # Cancelled, not finished: each stream was counted as a client that left.
    assert await asyncio.to_thread(_gone, slow_server) == gone_before + 4
    with slow_server.client() as client:
        assert client.get("/readyz").status_code == 200
    assert freed_in < 10
