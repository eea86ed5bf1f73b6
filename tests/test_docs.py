"""The docs cannot rot: every ```python block of README.md and docs/*.md runs, for real.

Each Markdown file runs in its own subprocess, its blocks in order in one namespace (a
later block uses what an earlier one defined), on the embedded model, offline, in a fresh
folder (files a tutorial writes land there) with the test session's COVEY_HOME. A block
may use top-level `await`. A traceback points at the Markdown file's own line. Commands that cannot
run here (a server in the foreground, a remote GPU box) go in ```bash blocks, and every
fence names its language, so no Python escapes the run by being left untagged.

By hand: `python tests/test_docs.py docs/tutorial.md`.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
LANGUAGES = {"python", "bash", "text", "json", "mermaid"}
# What a clean run never prints: a stream left early used to leave these behind.
NOISE = ("Task exception was never retrieved", "Event loop is closed", "Traceback")
TIMEOUT_S = 900


def fences(text: str) -> list[tuple[str, int, str]]:
    """Each fenced block as (language, line of its first code line, code)."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, start, body = m.group(1), number + 1, []
        elif lang is not None and line.rstrip() == "```":
            blocks.append((lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise AssertionError(f"a ```{lang} block opened on line {start - 1} is never closed")
    return blocks


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for lang, line, code in fences(path.read_text()) if lang == "python"]


def run_file(path: Path) -> None:
    """Run `path`'s Python blocks in order in one module namespace; top-level await runs
    on one event loop kept for the whole file."""
    module = types.ModuleType("__docs__")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    loop = asyncio.new_event_loop()
    try:
        for line, code in python_blocks(path):
            # padded with newlines so tracebacks and linecache show the Markdown's own lines
            source = "\n" * (line - 1) + code
            compiled = compile(source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            started = time.perf_counter()
            result = eval(compiled, module.__dict__)
            if inspect.iscoroutine(result):
                loop.run_until_complete(result)
            took = time.perf_counter() - started
            print(f"docs: {path.name}:{line - 1} ran in {took:.1f}s", file=sys.stderr, flush=True)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_every_fence_names_a_known_language():
    for path in FILES:
        for lang, line, _ in fences(path.read_text()):
            assert lang in LANGUAGES, f"{path.name}:{line - 1}: fence ```{lang} (use one of "
            f"{sorted(LANGUAGES)}: untagged code is never run)"


def test_the_docs_exist():
    names = {p.name for p in FILES}
    assert {"tutorial.md", "dsl.md", "performance.md", "serving.md", "README.md"} <= names


def _with_python() -> list[Path]:
    return [p for p in FILES if python_blocks(p)]


def pytest_generate_tests(metafunc):
    if "doc" in metafunc.fixturenames:
        docs = _with_python()
        metafunc.parametrize("doc", docs, ids=[p.name for p in docs])


def test_python_blocks_run(doc, tmp_path, covey_home):
    env = dict(os.environ)  # COVEY_HOME: the test session's (tests/conftest.py), not ~/.cache
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(doc)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    report = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"{doc.name}: a Python block failed\n{report}"
    for noise in NOISE:
        assert noise not in proc.stderr, f"{doc.name}: printed {noise!r}\n{report}"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        run_file(Path(arg).resolve())
