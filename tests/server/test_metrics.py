"""`/metrics` in Prometheus' format after real traffic, `/healthz` and `/readyz`, and the
metrics class fed a real engine's outputs."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from covey.server.metrics import ServerMetrics
from tests.server.sse import TEXT


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def server(live_server):
    return live_server()


def test_metrics_count_requests_generation_and_engine_load(server):
    with server.client() as client:
        before = _samples(client.get("/metrics").text)
        assert client.post("/apps/mapreduce_summary/invoke", json={"text": TEXT}).status_code == 200
        assert client.post("/apps/nope/invoke", json={}).status_code == 404
        reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    after = _samples(reply.text)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("covey_requests_total", app="mapreduce_summary", status="200") == 1
    assert grew("covey_requests_total", app="(unknown)", status="404") == 1
    assert grew("covey_request_seconds_count", app="mapreduce_summary") == 1
    assert grew("covey_ttft_seconds_count") == 2  # one per piece summary + the combine call
    assert grew("covey_tpot_seconds_count") == 2
    assert grew("covey_output_tokens_total") > 0 and grew("covey_prompt_tokens_total") > 0
    total = after[("covey_kv_blocks", frozenset({("state", "total")}))]
    parts = sum(after[("covey_kv_blocks", frozenset({("state", s)}))] for s in
                ("used", "cached", "pinned", "free"))
    assert total > 0 and parts == total
    for name in ("covey_kv_usage_ratio", "covey_prefix_cache_hit_rate", "covey_queue_depth",
                 "covey_requests_running", "covey_requests_paused"):
        assert (name, frozenset()) in after, name
    assert 0 < after[("covey_prefix_cache_hit_rate", frozenset())] <= 1  # shared prefixes hit


def test_healthz_and_readyz(server):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and "mapreduce_summary" in ready["apps"]
        server.state.ready = False  # as while the model and index load
        try:
            loading = client.get("/readyz")
            assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
            refused = client.post("/apps/mapreduce_summary/invoke", json={"text": TEXT})
            assert refused.status_code == 503
            assert client.get("/healthz").status_code == 200
        finally:
            server.state.ready = True


async def test_observe_generation_reads_a_real_engine_request(real_llm):
    from covey.llm_backend.sampling_params import SamplingParams

    metrics = ServerMetrics()
    final = await real_llm.generate_full("The capital of France is", SamplingParams(max_tokens=4))
    metrics.observe_generation(final.metrics)
    await metrics.refresh(real_llm)
    text = metrics.render().decode()
    assert re.search(r"^covey_ttft_seconds_count 1\.0$", text, re.M)
    assert re.search(r"^covey_output_tokens_total 4\.0$", text, re.M)
    assert re.search(r'^covey_kv_blocks\{state="used"\} 0\.0$', text, re.M)
