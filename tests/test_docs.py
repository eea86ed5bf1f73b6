"""The docs cannot rot: every ```python block of README.md and docs/*.md runs, for real.

Each Markdown file's blocks run in order in one namespace (a later block uses what an
earlier one defined), on the embedded model, offline, in a fresh folder (files a tutorial
writes land there) with the test session's COVEY_HOME. A block may use top-level `await`.
A traceback points at the Markdown file's own line. Commands that cannot run here (a server
in the foreground, a remote GPU box) go in ```bash blocks, and every fence names its
language, so no Python escapes the run by being left untagged.

All pages run in one child process, one after another, so the embedded model behind
`default_runtime()` loads once for the run rather than once per page (the model load is most
of a short page's time). Each page still starts clean: its own module namespace, event
loop and folder, and a default runtime with no retrievers bound, no tools and no per-app
timeouts (`fresh_default_runtime`), so a page cannot lean on what an earlier one set up.

By hand: `python tests/test_docs.py docs/tutorial.md` (several pages: run in that order).
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import inspect
import json
import os
import re
import subprocess
import symtable
import sys
import time
import traceback
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
LANGUAGES = {"python", "bash", "text", "json", "mermaid"}
# What a clean run never prints: a stream left early used to leave these behind.
NOISE = ("Task exception was never retrieved", "Event loop is closed", "Traceback")
TIMEOUT_S = 1800  # every page together
# Printed on stdout and stderr as each page starts, so each page's output can be told apart.
MARK = "=== covey docs page: "


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


def fresh_default_runtime() -> None:
    """Keep the default runtime's engine (its model is loaded) but give it a new `Runtime`
    with the defaults: the previous page's retrievers, tools, timeouts and pins go.

    Not fresh, unlike a new process: the engine's prefix cache, chunk store and counters
    (a page may hit KV an earlier one left, and its stats count earlier pages' requests),
    process state (`os.environ`, logging config, warnings filters, module globals), and
    a default runtime an earlier page closed or replaced (that page's choice stands). No
    page asserts on cache hits or engine stats today; one that does must not rely on this
    reset."""
    from covey.runtime import Runtime, set_default_runtime

    current = set_default_runtime(None)
    set_default_runtime(current)
    if current is None or current._closed:
        return
    previous = current.runtime
    for prefix in previous.pins:
        current._submit(current.llm.unpin(prefix)).result()
    previous.tools.close()
    current.runtime = Runtime(current.llm)


def run_pages(paths: list[Path], workdir: Path, report: Path) -> None:
    """Run each page in its own folder under `workdir`; `report` gets {page: error or None}
    after each page, so a crash still leaves the pages done so far."""
    results: dict[str, str | None] = {}
    for path in paths:
        for stream in (sys.stdout, sys.stderr):
            print(f"{MARK}{path.name}", file=stream, flush=True)
        folder = workdir / path.name
        folder.mkdir(parents=True, exist_ok=True)
        os.chdir(folder)
        try:
            fresh_default_runtime()
            run_file(path)
            results[path.name] = None
        except BaseException:
            results[path.name] = traceback.format_exc()
            print(results[path.name], file=sys.stderr, flush=True)
        report.write_text(json.dumps(results))


def test_every_fence_names_a_known_language():
    for path in FILES:
        for lang, line, _ in fences(path.read_text()):
            assert lang in LANGUAGES, f"{path.name}:{line - 1}: fence ```{lang} (use one of "
            f"{sorted(LANGUAGES)}: untagged code is never run)"


def test_the_docs_exist():
    names = {p.name for p in FILES}
    assert {"tutorial.md", "dsl.md", "performance.md", "serving.md", "README.md"} <= names


def test_the_tutorials_served_module_stands_alone():
    """Tutorial section 7 serves a module holding sections 3 and 4 without the calls: each
    name their code uses must be imported or defined there, not only in an earlier section
    (a name from section 1 passed the docs run, and every served request was a NameError)."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    sections = re.split(r"^## (?=\d+\. )", text, flags=re.MULTILINE)
    served = [part for part in sections if part[:2] in ("3.", "4.")]
    code = "".join(body for part in served for lang, _, body in fences(part) if lang == "python")
    module = ast.Module([s for s in ast.parse(code).body if _not_a_call(s)], type_ignores=[])
    assert len(module.body) >= 8, "sections 3 and 4 of the tutorial moved: update this test"
    top = symtable.symtable(ast.unparse(module), "support_app.py", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    missing = sorted(_globals_used(top) - defined - set(dir(builtins)))
    assert not missing, f"support_app.py would use {missing} without importing them"


def _not_a_call(statement: ast.stmt) -> bool:
    """What a module of definitions keeps: imports, definitions and constants."""
    kept = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    constant = isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant)
    return isinstance(statement, kept) or constant


def _globals_used(table: symtable.SymbolTable) -> set[str]:
    used = {s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()}
    for child in table.get_children():
        used |= _globals_used(child)
    return used


def _with_python() -> list[Path]:
    return [p for p in FILES if python_blocks(p)]


def pytest_generate_tests(metafunc):
    if "doc" in metafunc.fixturenames:
        docs = _with_python()
        metafunc.parametrize("doc", docs, ids=[p.name for p in docs])


def split_by_page(text: str) -> dict[str, str]:
    """Output printed from each page's start to the next page's ('' for what came before
    the first page). So the last page's share also holds what the interpreter printed at
    exit, and a page's share what an earlier page left running printed late (a stream
    reaped during it): `noise_origin` says so in a failure."""
    parts: dict[str, str] = {}
    name = ""
    for line in text.splitlines(keepends=True):
        if line.startswith(MARK):
            name = line[len(MARK) :].strip()
        else:
            parts[name] = parts.get(name, "") + line
    return parts


@pytest.fixture(scope="session")
def docs_run(request, tmp_path_factory, covey_home):
    """One child process runs every page this session selected, in FILES order."""
    selected = {
        item.callspec.params["doc"]
        for item in request.session.items
        if item.originalname == "test_python_blocks_run"
    }
    pages = [p for p in _with_python() if p in selected]
    base = tmp_path_factory.mktemp("docs")
    report = base / "report.json"
    env = dict(os.environ)  # COVEY_HOME: the test session's (tests/conftest.py), not ~/.cache
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--report", str(report),
         *map(str, pages)],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    results = json.loads(report.read_text()) if report.exists() else {}
    return proc, results


def noise_origin(doc: Path, pages: list[str]) -> str:
    """Where noise in `doc`'s share of the output may come from besides the page itself."""
    also = ["an earlier page's leftovers (a stream or task reaped while this page ran)"]
    if pages and pages[-1] == doc.name:
        also.append("the interpreter's exit (this is the last page: exit output lands here)")
    return "; it may also come from " + " or ".join(also)


def test_python_blocks_run(doc, docs_run):
    proc, results = docs_run
    out, err = split_by_page(proc.stdout), split_by_page(proc.stderr)
    mine_out, mine_err = out.get(doc.name, ""), err.get(doc.name, "")
    report = f"--- stdout\n{mine_out[-4000:]}\n--- stderr\n{mine_err[-8000:]}"
    whole = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    assert doc.name in results, f"{doc.name}: the docs run ended before this page\n{whole}"
    assert results[doc.name] is None, f"{doc.name}: a Python block failed\n{report}"
    origin = noise_origin(doc, [name for name in err if name])
    for noise in NOISE:
        assert noise not in mine_err, f"{doc.name}: printed {noise!r}{origin}\n{report}"
    assert proc.returncode == 0, f"the docs run exited with {proc.returncode}\n{whole}"
    for noise in NOISE:  # printed before the first page began (imports): every page answers
        assert noise not in err.get("", ""), f"the docs run printed {noise!r}\n{whole}"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--report"]:
        out = Path(args[1]).resolve()
        run_pages([Path(a).resolve() for a in args[2:]], out.parent / "pages", out)
    else:
        for arg in args:
            run_file(Path(arg).resolve())
