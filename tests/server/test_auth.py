"""Bearer-token auth: with a key set, API routes refuse a missing or wrong key (401) and
accept the right one; health checks and the docs stay open; without a key all is open."""

from __future__ import annotations

import pytest

from covey.server.auth import API_KEY_ENV, api_key
from covey.server.state import ServerSettings

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(live_server):
    return live_server(ServerSettings(api_key=KEY), kv_cache_tokens=1024)


def test_api_routes_need_the_key(server):
    with server.client() as client:
        for method, path in (("GET", "/apps"), ("GET", "/metrics"),
                             ("POST", "/apps/mapreduce_summary/invoke"),
                             ("POST", "/apps/nope/stream")):
            missing = client.request(method, path, json={"text": "x"})
            assert missing.status_code == 401, (path, missing.text)
            assert missing.headers["WWW-Authenticate"] == "Bearer"
            assert "API key" in missing.json()["error"]["message"]
            wrong = client.request(method, path, json={}, headers={"Authorization": "Bearer no"})
            assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]["message"]
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/apps", headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        # Past auth, a bad body is a 422 again, not a 401.
        reply = client.post("/apps/mapreduce_summary/invoke", json={}, headers=good)
        assert reply.status_code == 422


def test_health_checks_and_docs_stay_open(server):
    with server.client() as client:
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert client.get(path).status_code == 200, path
        schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_without_a_key_everything_is_open(live_server):
    with live_server().client() as client:
        assert client.get("/apps").status_code == 200


def test_the_key_comes_from_settings_or_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key(ServerSettings()) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key(ServerSettings()) == "from-env"
    assert api_key(ServerSettings(api_key="flag")) == "flag"
