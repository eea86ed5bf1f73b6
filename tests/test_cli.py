"""The `covey` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def covey(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covey.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_prints_a_greedy_completion():
    result = covey("generate", "The capital of France is", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_answers_each_turn_until_exit():
    result = covey(
        "chat",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        stdin="What is the capital of France?\n/reset\nName a color.\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "(conversation cleared)" in result.stdout


def test_bad_input_is_one_clear_error_line():
    result = covey("generate", "hi", "--model", "/no/such/model.gguf")
    assert result.returncode == 2
    assert "covey: error: model path '/no/such/model.gguf' does not exist" in result.stderr
    result = covey("generate", "hi", "--max-tokens", "0")
    assert result.returncode == 2 and "max_tokens must be a positive integer" in result.stderr
