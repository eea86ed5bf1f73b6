"""`covey serve` as a user runs it (a child process): answers health checks while it loads
(liveness 200, readiness 503), prints the chat page URL once ready, serves, and stops on
Ctrl-C even with a stream in flight; mistakes in its options fail fast with one line, before
any loading (checked in-process through the same entry point, `covey.cli.main.main`)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from covey.cli.main import main
from covey.cli.serve_command import GRACEFUL_ENV
from covey.errors import ConfigError
from covey.server.server_builder import (
    BUILTIN_APPS,
    builtin_apps,
    check_app_names,
    load_user_app,
    load_user_apps,
)
from tests.cli.runner import covey, covey_env

URL = re.compile(r"Chat page: (http://\S+)")
LISTENING = re.compile(r"listening on (http://\S+)")
# How long Ctrl-C lets the stream in flight go on: shorter than the default 5 s, still far
# shorter than the 1000-token stream, which Ctrl-C must abort rather than wait out.
GRACEFUL_S = 1


def test_serve_answers_health_checks_while_loading_then_serves_and_stops_on_ctrl_c(
    server_index,
):
    proc = subprocess.Popen(
        [sys.executable, "-m", "covey.cli.main", "serve", "--index", str(server_index.root),
         "--port", "0", "--device", "cpu", "--api-key", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=covey_env(**{GRACEFUL_ENV: str(GRACEFUL_S)}),
    )
    try:
        line = proc.stdout.readline()  # printed as the loading starts
        match = LISTENING.search(line)
        assert match, (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        loading = match.group(1)
        assert httpx.get(f"{loading}healthz", timeout=10).status_code == 200
        not_ready = httpx.get(f"{loading}readyz", timeout=10)
        assert not_ready.status_code == 503 and "loading" in not_ready.text
        busy = httpx.post(f"{loading}v1/completions", json={"prompt": "hi"}, timeout=10,
                          headers={"Authorization": "Bearer k"})
        assert busy.status_code == 503
        line = proc.stdout.readline()  # blocks until the server is ready (or exits)
        match = URL.search(line)
        assert match, (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        assert httpx.get(f"{url}readyz", timeout=30).status_code == 200
        apps = httpx.get(f"{url}apps", headers={"Authorization": "Bearer k"}, timeout=30).json()
        names = {a["name"] for a in apps["apps"]}
        assert {"rag_chatbot", "advanced_rag", "mapreduce_summary"} <= names
        assert httpx.get(f"{url}apps", timeout=30).status_code == 401
        body = {"prompt": "Count:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        auth = {"Authorization": "Bearer k"}
        with httpx.stream(
            "POST", f"{url}v1/completions", json=body, headers=auth, timeout=60
        ) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data:")  # generating
            proc.send_signal(signal.SIGINT)  # a stream in flight does not hold the exit
            proc.wait(timeout=GRACEFUL_S + 20)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    err = proc.stderr.read()
    assert "loading the model" in err and "index ready" in err, err
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err, err


def test_serve_refuses_a_port_in_use_before_loading_anything(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err, err
    assert "loading the model" not in err


def test_serve_refuses_an_app_it_cannot_import(capsys):
    code = main(["serve", "--port", "0", "--app", "no_such_module:app"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_module" in err, err
    assert "loading the model" not in err and "Traceback" not in err


def test_user_apps_are_named_module_colon_object():
    with pytest.raises(ConfigError, match="module:object"):
        load_user_app("json")
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        load_user_app("json:nothing")
    with pytest.raises(ConfigError, match="must be an App"):
        load_user_app("json:JSONDecoder")
    assert load_user_app("covey.apps.mapreduce_summary:summary_app").name == "mapreduce_summary"
    assert load_user_app("covey.apps.advanced_rag:build_advanced_rag_app").name == "advanced_rag"


BROKEN_APPS = {
    "syntax": ("covey_test_broken_syntax", "def app(:\n", "SyntaxError"),
    "raises": ("covey_test_broken_import", "raise RuntimeError('no config file')\n", "no config"),
    "exits": ("covey_test_broken_exit", "import sys\nsys.exit('usage: x')\n", "SystemExit"),
    "factory-exits": (
        "covey_test_exiting_factory",
        "import sys\ndef app():\n    sys.exit(2)\n",
        "SystemExit: 2",
    ),
    "factory": (
        "covey_test_broken_factory",
        "def app():\n    raise ValueError('bad setting')\n",
        "ValueError: bad setting",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_APPS))
def test_a_broken_user_app_is_one_line_naming_the_spec(case, tmp_path, monkeypatch):
    module, source, message = BROKEN_APPS[case]
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message) as caught:
        load_user_app(f"{module}:app")
    assert str(caught.value).startswith(f"--app '{module}:app': ")
    assert caught.value.__cause__ is not None  # chained: the traceback is there for a debugger


def test_a_callable_that_needs_arguments_is_one_line(capsys):
    code = main(["serve", "--port", "0", "--app", "json:dumps"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "loading the model" not in err, err
    assert err.startswith("covey: error: --app 'json:dumps': calling dumps() failed: TypeError")


def test_an_unknown_log_level_is_a_usage_error(capsys):
    import uvicorn.config

    from covey.cli.serve_command import LOG_LEVELS

    assert set(LOG_LEVELS) == set(uvicorn.config.LOG_LEVELS)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", "--log-level", "loud"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--log-level: invalid choice: 'loud'" in err, err


NAMED_APPS = """
import covey.graph as cg

@cg.function
def shout(text: str) -> str:
    return text.upper()


def named(name):
    def loud(text: str):
        return {"out": shout(text=text)}

    return cg.app(name=name)(loud)


first = named("mine")
second = named("mine")
builtin = named("advanced_rag")
slashed = named("team/qa")
spaced = named("my app")
"""


@pytest.fixture
def named_apps(tmp_path, monkeypatch):
    (tmp_path / "covey_test_named_apps.py").write_text(NAMED_APPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "covey_test_named_apps"


def test_the_builtin_app_names_written_out_are_the_built_ones():
    assert BUILTIN_APPS == tuple(builtin_apps())


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        (["builtin"], "'advanced_rag' is taken .*rename it with @cg.app"),
        (["first", "second"], "'mine' is given to two apps; rename it"),
        (["slashed"], "'team/qa' cannot be served: .*path segment"),
        (["spaced"], "'my app' cannot be served"),
    ],
)
def test_a_user_app_name_that_cannot_be_served_is_refused(named_apps, objects, message):
    specs = [f"{named_apps}:{name}" for name in objects]
    with pytest.raises(ConfigError, match=message) as caught:
        load_user_apps(specs)
    assert str(caught.value).startswith(f"--app {specs[-1]!r}: ")
    assert [app.name for app in load_user_apps([f"{named_apps}:first"])] == ["mine"]


def test_serve_refuses_a_user_app_replacing_the_chatbot_before_loading(capsys):
    code = main(["serve", "--port", "0", "--app", "covey.apps.rag_chatbot:build_rag_app"])
    err = capsys.readouterr().err
    assert code == 2 and "'rag_chatbot' is taken" in err and "loading the model" not in err, err


def test_serving_checks_names_against_the_apps_given(named_apps):
    apps = [load_user_app(f"{named_apps}:first")]
    check_app_names(apps, taken=())
    with pytest.raises(ConfigError, match="'mine' is taken"):
        check_app_names(apps, taken=("mine",))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--remote-api-key", "x"], "--remote-api-key goes with --remote"),
        (["--remote", "http://127.0.0.1:9", "--device", "cuda"], "--device: for a local engine"),
        (["--remote", "http://127.0.0.1:9", "--dtype", "float32"], "--dtype: for a local"),
        (["--remote", "http://127.0.0.1:9", "--no-compile"], "--compile: for a local engine"),
    ],
)
def test_remote_options_are_checked_before_anything_loads(capsys, argv, message):
    code = main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "loading" not in err and "connecting" not in err and "Traceback" not in err


def test_a_remote_that_is_no_url_is_named_by_its_option(capsys):
    code = main(["serve", "--port", "0", "--remote", "not-a-url"])
    err = capsys.readouterr().err
    assert code == 2 and "--remote must be an http(s) URL" in err and "base_url" not in err, err


class _RefusingRemote(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that refuses every key, as OpenAI words it."""

    def do_GET(self) -> None:
        body = b'{"error": {"message": "Incorrect API key", "type": "authentication_error"}}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def refusing_remote():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingRemote)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("key", "hint"), [(["--remote-api-key", "x"], "check"), ([], "give")])
def test_a_refused_remote_key_names_the_option(refusing_remote, capsys, key, hint):
    code = main(["serve", "--port", "0", "--remote", refusing_remote, *key])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"--remote {refusing_remote}: remote server answered 401" in err, err
    assert f"({hint} " in err and "--remote-api-key)" in err and "api_key)" not in err, err


def test_serve_help_lists_its_options():
    result = covey("serve", "--help", timeout=60)
    for option in ("--app", "--host", "--port", "--model", "--index", "--api-key"):
        assert option in result.stdout


@pytest.mark.parametrize("value", ["5s", "-1", "nan", "inf"])
def test_a_bad_grace_is_refused_before_anything_loads(value, monkeypatch, capsys):
    from covey.cli import serve_command
    from covey.cli.main import main
    from covey.server import state

    def no_load(*args, **kwargs):
        raise AssertionError("the server loaded before the grace was checked")

    monkeypatch.setattr(state, "ServerState", no_load)  # serve imports it when it runs
    monkeypatch.setenv(GRACEFUL_ENV, value)
    code = main(["serve", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and GRACEFUL_ENV in err and "Traceback" not in err
    monkeypatch.setenv(GRACEFUL_ENV, "0.5")
    assert serve_command.graceful_seconds() == 0.5
