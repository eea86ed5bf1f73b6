"""The `covey` command line, run as a user runs it."""

from __future__ import annotations

from tests.cli.runner import covey


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
