"""Bad input on the command line: one line `covey: error: ...` on stderr, the exit code of
the error's category, and never a traceback. Each case runs the real entry point in a
child process; where the model is not the point, `dummy:tiny` keeps it fast."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from covey.errors import ErrorCategory
from covey.llm_backend.tokenizer import load_default_tokenizer
from tests.cli.runner import covey, covey_env

INVALID = ErrorCategory.INVALID.exit_code
NOT_FOUND = ErrorCategory.NOT_FOUND.exit_code
TINY = ("--model", "dummy:tiny")


def assert_one_line_error(result: subprocess.CompletedProcess, exit_code: int, message: str):
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("covey: error: "), result.stderr
    assert message in result.stderr, result.stderr
    assert result.returncode == exit_code, result.stderr


@pytest.fixture(scope="module")
def tokenizer_cache(covey_home) -> Path:
    """The session home's cache of the embedded GGUF's tokenizer, written by the first load
    in this process (none when that load ran under another home: the homes then start
    empty, only slower)."""
    load_default_tokenizer()
    return Path(covey_home) / "tokenizers"


@pytest.fixture
def home(tmp_path, monkeypatch, tokenizer_cache):
    """A COVEY_HOME with no index, so no default index is built or found by accident. It
    holds a copy of the tokenizer cache: a child over `dummy:tiny` in an empty home reads
    the tokenizer out of the GGUF again (seconds on 2 cores, for every such test)."""
    if tokenizer_cache.is_dir():
        shutil.copytree(tokenizer_cache, tmp_path / "home" / "tokenizers")
    monkeypatch.setenv("COVEY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "rockets.md").write_text("# Rockets\n\nA rocket burns fuel to reach orbit.")
    return folder


def test_cuda_on_a_machine_without_cuda(home):
    result = covey("generate", "hi", "--device", "cuda", CUDA_VISIBLE_DEVICES="")
    assert_one_line_error(result, INVALID, "device is 'cuda' but CUDA is not available")


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_unknown_device(home, device):
    result = covey("generate", "hi", "--device", device)
    assert_one_line_error(result, INVALID, "device must be 'auto', 'cpu' or 'cuda[:N]'")


def test_unknown_dtype(home):
    result = covey("generate", "hi", "--dtype", "float8")
    assert_one_line_error(result, INVALID, "EngineConfig.dtype must be 'auto' or one of")


def test_missing_model_file(home, tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    result = covey("generate", "hi", "--model", str(missing))
    assert_one_line_error(result, NOT_FOUND, f"model path '{missing}' does not exist")


def test_unknown_dummy_preset(home):
    result = covey("generate", "hi", "--model", "dummy:huge")
    assert_one_line_error(result, NOT_FOUND, "unknown dummy preset 'huge'")


def test_garbage_gguf_file(home, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x07" * 40)
    result = covey("generate", "hi", "--model", str(garbage))
    assert_one_line_error(result, INVALID, str(garbage))


def test_a_file_that_is_no_gguf(home, docs):
    result = covey("generate", "hi", "--model", str(docs / "rockets.md"))
    assert_one_line_error(result, INVALID, "is not a .gguf file")


def test_a_folder_that_is_no_model(home, docs):
    result = covey("generate", "hi", "--model", str(docs))
    assert_one_line_error(result, INVALID, "has no config.json")


def test_empty_prompt(home):
    result = covey("generate", "", *TINY)
    assert_one_line_error(result, INVALID, "the prompt is empty")


def test_empty_prompt_from_stdin(home):
    result = covey("generate", "-", *TINY, stdin="")
    assert_one_line_error(result, INVALID, "the prompt is empty")


def test_an_empty_prompt_is_refused_before_the_model_loads(home, tmp_path):
    """A real model takes 20-50 s to load: a model that does not exist shows which check
    comes first."""
    result = covey("generate", "-", "--model", str(tmp_path / "absent.gguf"), stdin="")
    assert_one_line_error(result, INVALID, "the prompt is empty")


def test_prompt_on_stdin_that_is_not_utf8(home):
    result = subprocess.run(
        [sys.executable, "-m", "covey.cli.main", "generate", "-", *TINY],
        input=b"\xff\xfe latin-1 caf\xe9",
        capture_output=True,
        env=covey_env(),
    )
    decoded = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    assert_one_line_error(decoded, INVALID, "the prompt on stdin is not UTF-8 text")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_max_tokens_not_positive(home, value):
    result = covey("generate", "hi", "--max-tokens", value, *TINY)
    assert_one_line_error(result, INVALID, f"max_tokens must be a positive integer, got {value}")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--temperature", "nan", "temperature"),
        ("--temperature", "-1", "temperature must be"),
        ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--top-k", "-1", "top_k must be >= 0"),
    ],
)
def test_bad_sampling_option(home, option, value, message):
    result = covey("generate", "hi", option, value, "--max-tokens", "2", *TINY)
    assert_one_line_error(result, INVALID, message)


def test_missing_index(home):
    result = covey("search", "q", "--index", "/nonexistent")
    assert_one_line_error(result, NOT_FOUND, "no index at /nonexistent")


def test_index_path_that_is_a_file(home, docs):
    result = covey("search", "q", "--index", str(docs / "rockets.md"))
    assert_one_line_error(result, NOT_FOUND, f"no index at {docs / 'rockets.md'}")


@pytest.mark.parametrize("k", ["0", "-2"])
def test_k_not_positive(home, k):
    result = covey("search", "q", "-k", k, "--index", "/nonexistent")
    assert_one_line_error(result, INVALID, f"k must be a positive integer, got {k}")


def test_empty_query(home):
    result = covey("search", "  ", "--index", "/nonexistent")
    assert_one_line_error(result, INVALID, "query must be a non-empty string")


def test_ingest_a_missing_path(home, tmp_path):
    result = covey("index", str(tmp_path / "nope"), "--index", str(tmp_path / "idx"))
    assert_one_line_error(result, INVALID, f"no such file or directory: {tmp_path / 'nope'}")


def test_ingest_into_a_file(home, docs):
    target = docs / "rockets.md"
    result = covey("index", str(docs), "--index", str(target), "--quiet")
    assert_one_line_error(result, INVALID, f"{target} is a file, not an index directory")


def test_ingest_with_a_bad_chunk_size(home, docs, tmp_path):
    result = covey("index", str(docs), "--index", str(tmp_path / "i"), "--chunk-tokens", "0")
    assert_one_line_error(result, INVALID, "chunk_tokens must be > 0")


def test_system_prompt_with_docs_chat(home):
    result = covey("chat", "--docs", "--system", "be brief")
    assert_one_line_error(result, INVALID, "--system does not apply with --docs")


def test_argparse_errors_stay_argparse_errors(home):
    result = covey("generate", "hi", "--max-tokens", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "covey generate: error: argument --max-tokens: invalid int value" in result.stderr


def test_ctrl_c_exits_130_quietly(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "covey.cli.main", "chat", *TINY],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=covey_env(),
        # As a terminal starts it: a background job of a non-interactive shell (a CI
        # runner's, say) inherits SIGINT ignored, and Python then installs no handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        seen = []
        for line in proc.stderr:  # waits until the chat reads its first message
            seen.append(line)
            if line.startswith("covey chat with"):
                break
        assert seen and seen[-1].startswith("covey chat with"), seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_closed_stdout_is_no_traceback(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "covey.cli.main", "generate", "hi", "--max-tokens", "4", *TINY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=covey_env(),
    )
    proc.stdout.close()  # the reader is gone before covey writes: `covey generate ... | true`
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err
    assert proc.returncode == 1


def test_a_bug_keeps_its_traceback(home):
    """Only CoveyErrors are the user's to fix; anything else is covey's bug and must show
    where it happened."""
    script = (
        "import sys, covey.cli.retrieval_commands as r\n"
        "def boom(args): raise RuntimeError('a bug in covey')\n"
        "r.run_search = boom\n"
        "from covey.cli.main import main\n"
        "sys.exit(main(['search', 'q']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=covey_env()
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: a bug in covey" in result.stderr
