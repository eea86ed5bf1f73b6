"""`--chunk-cache`, `--chunk-store-bytes`, `--chunk-store-dir` and `--chunk-store-disk-bytes`
on the commands whose prompts carry retrieved chunks (`covey serve`, `covey chat --docs`):
parsed (sizes in bytes or with a unit), carried into the EngineConfig the command builds
(`covey serve` and each of its Ray replicas included), and a bad value is a usage error
(exit 2), never a traceback; `covey generate` and plain `covey chat` refuse them. No model
loads: the parsing and the config prove it."""

from __future__ import annotations

import pytest

from covey.cli import engine_args
from covey.cli.engine_args import CHUNK_CACHE_CHOICES, chunk_store_config, parse_size
from covey.cli.main import build_parser, main
from covey.llm_backend.config import CHUNK_CACHE_MODES, EngineConfig
from tests.cli.runner import covey

COMMANDS = [["chat", "--docs"], ["serve"]]


@pytest.fixture
def kv_dir(tmp_path) -> str:
    return str(tmp_path / "kv")


def given(folder: str) -> list[str]:
    return [
        "--chunk-cache",
        "exact",
        "--chunk-store-bytes",
        "512MiB",
        "--chunk-store-dir",
        folder,
        "--chunk-store-disk-bytes",
        "10GB",
    ]


def want(folder: str) -> dict:
    return {
        "chunk_cache": "exact",
        "chunk_store_bytes": 512 << 20,
        "chunk_store_dir": folder,
        "chunk_store_disk_bytes": 10 * 10**9,
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_the_chunk_commands_take_the_chunk_options(command, kv_dir):
    args = build_parser().parse_args([*command, *given(kv_dir)])
    assert chunk_store_config(args) == want(kv_dir)
    assert chunk_store_config(build_parser().parse_args(command)) == {}  # defaults hold


def test_the_choices_are_the_engine_configs_modes():
    assert CHUNK_CACHE_CHOICES == CHUNK_CACHE_MODES


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2147483648", 2 << 30),
        ("0", 0),
        ("512MiB", 512 << 20),
        ("2GiB", 2 << 30),
        ("2gib", 2 << 30),
        ("1.5 GiB", 3 << 29),
        ("64KiB", 64 << 10),
        ("1TiB", 1 << 40),
        ("500MB", 500 * 10**6),
        ("2kB", 2000),
        ("100B", 100),
        ("0.1kB", 100),
        ("1024TiB", 1 << 50),
    ],
)
def test_sizes_in_bytes_or_with_a_unit(text, size):
    assert parse_size(text) == size


def test_the_built_engine_config_carries_the_values(kv_dir):
    args = build_parser().parse_args(["chat", "--docs", *given(kv_dir)])
    config = engine_args.engine_config(args)
    assert {name: getattr(config, name) for name in want(kv_dir)} == want(kv_dir)
    default = engine_args.engine_config(build_parser().parse_args(["chat", "--docs"]))
    assert (default.chunk_cache, default.chunk_store_bytes) == ("blend", 2 << 30)
    assert default.chunk_store_dir is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--chunk-cache", "fuzzy"], "argument --chunk-cache: invalid choice: 'fuzzy'"),
        (["--chunk-store-bytes", "2G"], "invalid size '2G': give bytes (2147483648)"),
        (["--chunk-store-bytes", "-1"], "invalid size '-1': must not be negative"),
        (["--chunk-store-bytes=-1GiB"], "invalid size '-1GiB': must not be negative"),
        (
            ["--chunk-store-bytes", "1.00000000000000000000000000000001GiB"],
            "not a whole number of bytes",  # exact past 28 digits
        ),
        (["--chunk-store-disk-bytes", "1025TiB"], "invalid size '1025TiB': at most 1PiB"),
        (["--chunk-store-bytes", "lots"], "invalid size 'lots'"),
        (["--chunk-store-bytes", "1.5"], "invalid size '1.5': not a whole number of bytes"),
        (["--chunk-store-disk-bytes", "0"], "invalid size '0': must be above 0"),
        (["--chunk-store-bytes", "0"], "invalid size '0': must be above 0"),
    ],
)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_value_is_a_usage_error(capsys, command, argv, message):
    with pytest.raises(SystemExit) as exited:
        main([*command, *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err
    assert err.startswith("usage: covey ")


def test_a_bad_size_from_the_shell(tmp_path):
    """The real entry point in a child: exit 2, argparse's message, no traceback."""
    out = covey("serve", "--chunk-store-bytes", "2 gigs", COVEY_HOME=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "argument --chunk-store-bytes: invalid size '2 gigs'" in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_does_not_take_them(capsys):
    """A plain prompt has no chunk segments: the options would do nothing there."""
    with pytest.raises(SystemExit) as exited:
        main(["generate", "hi", "--chunk-cache", "off"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "unrecognized arguments: --chunk-cache off" in err


def test_plain_chat_refuses_them_before_loading(capsys):
    code = main(["chat", "--chunk-store-bytes", "1GiB", "--chunk-cache", "exact"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--chunk-cache, --chunk-store-bytes go with --docs" in err


def test_plain_chat_refuses_an_index_before_loading(capsys, tmp_path):
    """The help says --index is for --docs: plain chat would ignore it silently."""
    code = main(["chat", "--index", str(tmp_path), "--chunk-cache", "exact"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--index, --chunk-cache go with --docs: plain chat retrieves nothing" in err


class Loaded(Exception):
    """Raised where `covey serve` would load the model or start the replicas."""


def _capture(calls: dict, name: str):
    def record(*args, **kwargs):
        calls[name] = kwargs
        raise Loaded

    return record


def test_serve_hands_the_options_to_its_engine(monkeypatch, kv_dir):
    from covey.server import server_builder

    calls: dict = {}
    monkeypatch.setattr(server_builder, "load_into", _capture(calls, "local"))
    with pytest.raises(Loaded):
        main(["serve", "--port", "0", *given(kv_dir)])
    assert {name: calls["local"][name] for name in want(kv_dir)} == want(kv_dir)


def test_serve_hands_the_options_to_each_ray_replica(monkeypatch, kv_dir):
    from covey.server import ray_cluster

    calls: dict = {}
    monkeypatch.setattr(ray_cluster, "start_ray_engine", _capture(calls, "ray"))
    with pytest.raises(Loaded):
        main(["serve", "--port", "0", "--ray", "--replicas", "1", *given(kv_dir)])
    config = calls["ray"]["engine_config"]
    assert {name: config[name] for name in want(kv_dir)} == want(kv_dir)
    EngineConfig(**config)  # what a replica builds from it


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--remote", "http://127.0.0.1:9", "--chunk-cache", "off"],
            "--chunk-cache: for a local engine only, not with --remote",
        ),
        (
            ["--ray", "--chunk-store-dir", "/tmp/covey-kv"],
            "--chunk-store-dir with --ray takes --replicas 1",
        ),
    ],
)
def test_serve_refuses_chunk_options_it_cannot_honour(capsys, argv, message):
    code = main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--chunk-store-disk-bytes", "1GiB"],
            "--chunk-store-disk-bytes goes with --chunk-store-dir",
        ),
        (
            ["--chunk-cache", "off", "--chunk-store-bytes", "1GiB", "--chunk-store-dir", "kv"],
            "--chunk-store-bytes, --chunk-store-dir: no chunk store with --chunk-cache off",
        ),
        (["--chunk-store-dir", ""], "--chunk-store-dir needs a folder name, got an empty one"),
        (["--chunk-store-dir", "{file}"], "--chunk-store-dir '{file}' is a file, not a folder"),
        (["--chunk-store-dir", "{file}/kv"], "'{file}/kv': '{file}' is a file, not a folder"),
        (["--chunk-store-dir", "{dir}/kv"], "cannot be created or written"),
    ],
)
@pytest.mark.parametrize("command", COMMANDS)
def test_options_that_would_do_nothing_or_fail_later_are_refused_first(
    capsys, monkeypatch, tmp_path, command, argv, message
):
    """Checked before the model (or the docs index) loads: exit 2 with the reason, and no
    folder made (a relative `kv` would land in the working folder: tmp_path here)."""
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "file"
    file.write_text("")
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(engine_args.tempfile, "TemporaryFile", _not_permitted)  # root writes
    argv = [arg.replace("{file}", str(file)).replace("{dir}", "locked") for arg in argv]
    code = main([*command, *argv])
    err = capsys.readouterr().err
    message = message.replace("{file}", str(file))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "kv").exists()


def _not_permitted(*_args, **_kwargs):
    raise PermissionError(13, "Permission denied")


def test_ray_replicas_get_the_folder_as_an_absolute_path(monkeypatch, tmp_path):
    """A replica's working folder is Ray's, not the shell's: a relative --chunk-store-dir is
    resolved where `covey serve` runs."""
    from covey.server import ray_cluster

    calls: dict = {}
    monkeypatch.setattr(ray_cluster, "start_ray_engine", _capture(calls, "ray"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Loaded):
        main(["serve", "--port", "0", "--ray", "--replicas", "1", "--chunk-store-dir", "kv"])
    assert calls["ray"]["engine_config"]["chunk_store_dir"] == str((tmp_path / "kv").resolve())
