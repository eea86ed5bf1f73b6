"""A benchmark that lacks its extras stops at once, naming the install command, instead of
measuring for minutes and then failing to plot."""

from __future__ import annotations

import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.runner import covey_env

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Run a benchmark as `python benchmarks/NAME.py ARGS` would, with some modules made
# unimportable (a None entry in sys.modules makes `import name` raise ImportError).
HIDE_AND_RUN = """
import os, runpy, sys
hidden, script, *args = sys.argv[1:]
for name in hidden.split(","):
    sys.modules[name] = None
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` puts its folder first
runpy.run_path(script, run_name="__main__")
"""


def run_hidden(hidden: list[str], name: str, *args: str) -> subprocess.CompletedProcess:
    script = str(BENCHMARKS / f"{name}.py")
    return subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN, ",".join(hidden), script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=covey_env(),
    )


@pytest.mark.parametrize("name", ["apps", "async_engine", "engine", "rag_kv", "retrieval", "tools"])
def test_missing_matplotlib_stops_before_measuring(tmp_path, name):
    out = tmp_path / "out.json"
    start = time.perf_counter()
    result = run_hidden(["matplotlib"], name, "--quick", "--json", str(out))
    elapsed = time.perf_counter() - start
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"benchmarks/{name}.py needs matplotlib" in result.stderr
    assert 'run `make bench` or `pip install -e ".[bench]"`' in result.stderr
    assert not out.exists()  # stopped before any measuring
    assert elapsed < 60  # seconds of imports at most, not minutes of measuring


def test_a_missing_peer_is_not_a_required_extra(tmp_path):
    """llama.cpp is a peer: shared/BENCHMARKS.md records it as null with a reason, so with
    both absent only the plotting extra is named as missing."""
    result = run_hidden(["matplotlib", "llama_cpp"], "engine", "--quick", "--json", "x.json")
    assert result.returncode == 1, result.stderr
    assert "needs matplotlib, not installed" in result.stderr
    assert "llama-cpp-python" not in result.stderr


def test_help_needs_no_extras():
    """torch hidden too: apps.py sets covey's OpenMP spin before torch loads, which only
    works while nothing imported before that line pulls torch in."""
    result = run_hidden(["matplotlib", "llama_cpp", "torch"], "apps", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout, result.stderr


def test_rag_kv_judges_accuracy_on_the_paired_interval():
    """`ok` only when the whole 95% interval is within the margin; a point estimate inside it
    with an interval that reaches a larger loss is inconclusive, not a pass."""
    rag_kv = runpy.run_path(str(BENCHMARKS / "rag_kv.py"), run_name="rag_kv_under_test")
    verdict = rag_kv["verdict"]
    assert verdict([-0.01, 0.015]) == "ok"
    assert verdict([-0.02, 0.0]) == "ok"
    assert verdict([-0.06, 0.05]) == "inconclusive"  # point estimate -0.005: inside the margin
    assert verdict([-0.12, -0.03]) == "MISSED"
    # 160 questions, 5 lost and 3 won: -0.0125, inside the margin, but the interval is not.
    got = rag_kv["paired"]([False] * 5 + [True] * 155, [True] * 5 + [False] * 3 + [True] * 152)
    assert got["diff"] == -0.0125 and got["ci95"][0] < -0.04
    assert verdict(got["ci95"]) == "inconclusive"
