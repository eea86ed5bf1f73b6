"""The server on Ray Serve replicas answers as the single-process server does, and its
router sends repeated prefixes back to the replica that holds their KV."""

from __future__ import annotations

import pytest

from covey.server.replica_router import BLOCK_CHARS
from tests.server.sse import sample_inputs

CHAT = [{"role": "user", "content": "What is a Python list?"}]
SYSTEM = (
    "You are covey's assistant for questions about the Python standard library. Answer in "
    "one short sentence, name the module involved, and never invent functions that do not "
    "exist. If the question is not about Python, say that you only answer Python questions. "
) * 3


async def report(handle):
    return await handle.report.remote()


@pytest.fixture(scope="module")
def single(live_server):
    return live_server()


@pytest.mark.parametrize("name", ["rag_chatbot", "mapreduce_summary"])
def test_apps_answer_as_the_single_process_server_does(single, ray_server, name):
    with single.client() as a, ray_server.client() as b:
        inputs = sample_inputs(a.get(f"/apps/{name}").json()["input_schema"])
        expected = a.post(f"/apps/{name}/invoke", json=inputs)
        got = b.post(f"/apps/{name}/invoke", json=inputs)
    assert expected.status_code == got.status_code == 200, got.text
    key = "summary" if name == "mapreduce_summary" else "answer"
    assert got.json()["outputs"][key] == expected.json()["outputs"][key]
    assert got.json()["outputs"][key]


def test_chat_completions_answer_as_the_single_process_server_does(single, ray_server):
    model = ray_server.state.engine.model_name
    body = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    with single.client() as a, ray_server.client() as b:
        expected = a.post("/v1/chat/completions", json=body).json()
        got = b.post("/v1/chat/completions", json=body).json()
        streamed = b.post("/v1/chat/completions", json={**body, "stream": True}).text
    assert "choices" in got, got
    text = got["choices"][0]["message"]["content"]
    assert text and text == expected["choices"][0]["message"]["content"]
    for count in ("prompt_tokens", "completion_tokens"):  # cache hits depend on the past
        assert got["usage"][count] == expected["usage"][count]
    assert '"finish_reason":"length"' in streamed.replace(" ", "")


def test_repeated_prefixes_go_to_the_replica_that_holds_them(ray_server):
    engine = ray_server.state.engine
    ray_server.wait_idle()
    served = {r.name: r.served for r in engine.replica_states()}
    hits = {r.name: r.stats.prefix_cache_hit_tokens for r in engine.replica_states()}
    decisions = dict(engine.router.counters.decisions)
    questions = ["What is os.path?", "What does json.dumps do?", "What is a deque?", "Why re?"]
    with ray_server.client() as client:
        for q in questions:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            body = {"model": engine.model_name, "messages": messages, "max_tokens": 2}
            reply = client.post("/v1/chat/completions", json={**body, "temperature": 0})
            assert reply.status_code == 200, reply.text
        ray_server.call(engine.stats(refresh=True))  # the replicas' own hit counters, now
        metrics = client.get("/metrics").text
    grew = {r.name: r.served - served[r.name] for r in engine.replica_states()}
    assert sorted(grew.values()) == [0, len(questions)], grew  # all on one replica
    (home,) = [name for name, n in grew.items() if n]
    after = engine.router.counters.decisions
    assert after.get("affinity", 0) - decisions.get("affinity", 0) >= len(questions) - 1
    # Real KV reuse on that replica: the 3 later requests found the system prompt cached.
    stats = next(r.stats for r in engine.replica_states() if r.name == home)
    system_tokens = len(engine.tokenizer.encode(SYSTEM))
    assert stats.prefix_cache_hit_tokens - hits[home] >= 3 * (system_tokens - 32)
    # The replicas' own reports say where the system prompt's KV is (in the router's
    # units), and the router's mirror of `home` took them in.
    reports = {r.name: ray_server.call(report(r.handle)) for r in engine.replica_states()}
    (other,) = [name for name in reports if name != home]
    only_home = {h: n for h, n in reports[home].units.items() if h not in reports[other].units}
    # Every whole unit of the system prompt: the unit holding its end holds the question
    # too, and is held only when the last prompt's tokens happen to fill a whole block.
    assert sum(only_home.values()) >= len(SYSTEM) // BLOCK_CHARS * BLOCK_CHARS
    assert set(only_home) <= set(engine.router.views[home].prefixes)
    assert not set(only_home) & set(engine.router.views[other].prefixes)
    # ...and the cost model's inputs: the engine's measured prefill speed, nothing queued.
    for name, rep in reports.items():
        assert rep.queued_prefill_tokens == 0 and rep.prefill_profile[1] > 0
        assert engine.router.views[name].per_token_s > 0
    assert 'covey_router_decisions_total{decision="affinity",policy="cache_aware"}' in metrics
    assert f'covey_replica_up{{replica="{home}"}} 1.0' in metrics
    assert "covey_replica_prefix_cache_hit_rate" in metrics
