from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from covey.apps.rag_chatbot import open_pydocs_index
from covey.cli import main as cli_main
from covey.errors import InvalidRequestError
from covey.retrieval import default_corpus
from covey.retrieval.corpus_eval import (
    QUESTIONS,
    evaluate,
    evaluation_subset,
    expected_sources,
    hit_rate,
)
from covey.retrieval.default_corpus import (
    CORPUS_VERSION,
    corpus_identity,
    corpus_is_current,
    default_documents,
    default_index_dir,
    ensure_default_index,
    fill_index,
    pydoc_documents,
)
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.stdlib_docs import MODULES, stdlib_documents

OLD = Path(__file__).parent / "data" / "old_format"
# Documents besides the evaluation's answers in the test's index (corpus_eval's fixed seed).
DISTRACTORS = 300
# hit@3 the subset index must reach. Measured: see test_evaluation_hit_at_3's docstring.
MIN_HIT_AT_3 = 0.8


def test_default_location_follows_covey_home(monkeypatch, tmp_path):
    monkeypatch.setenv("COVEY_HOME", str(tmp_path))
    assert default_index_dir() == tmp_path / "indexes" / "pydocs"
    monkeypatch.delenv("COVEY_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_index_dir() == tmp_path / "user" / ".cache" / "covey" / "indexes" / "pydocs"


def test_pydoc_documents_are_cpython_topics():
    docs = pydoc_documents()
    assert len(docs) > 50
    names = {d.source for d in docs}
    assert {"pydoc:for", "pydoc:try", "pydoc:assert"} <= names
    assert [d.source for d in pydoc_documents(limit=2)] == ["pydoc:assert", "pydoc:assignment"]
    with pytest.raises(InvalidRequestError, match="limit must be > 0"):
        pydoc_documents(limit=0)


def test_default_corpus_documents_builtins_and_stdlib_by_name():
    docs = default_documents()
    by_source = {d.source: d.text for d in docs}
    assert len(by_source) == len(docs)  # one document per name
    topics = pydoc_documents()
    assert docs[: len(topics)] == topics  # topics first: `limit` takes topics
    assert by_source["pydoc:builtins.open"].startswith(
        "builtins.open(file, mode='r', buffering=-1"
    )
    assert "Open file and return a stream." in by_source["pydoc:builtins.open"]
    assert "Python method builtins.str.split." in by_source["pydoc:builtins.str.split"]
    for name in ("json.dumps", "os.path.join", "pathlib.Path.read_text", "re.sub"):
        assert f"pydoc:{name}" in by_source, name
    # Each object once, under the module that is its home: open is builtins', not io's;
    # datetime.date is not sqlite3.Date; shared io methods go to the base class.
    assert "pydoc:io.open" not in by_source and "pydoc:sqlite3.Date" not in by_source
    assert "pydoc:datetime.date.today" in by_source
    assert "pydoc:io.IOBase.readlines" in by_source
    assert "pydoc:io.BufferedRWPair.readlines" not in by_source
    # A class without a docstring of its own is documented by its constructor's.
    assert "Initializes a new ThreadPoolExecutor" in by_source[
        "pydoc:concurrent.futures.ThreadPoolExecutor"
    ]
    modules = {s.split(":", 1)[1].rsplit(".", 1)[0] for s in by_source}
    assert [m for m in MODULES if m not in modules] == []
    assert expected_sources() <= by_source.keys()  # the evaluation asks for real documents
    assert [d.source for d in default_documents(limit=2)] == [d.source for d in topics[:2]]
    with pytest.raises(InvalidRequestError, match="limit must be > 0"):
        default_documents(limit=-1)


def test_built_once_then_opened(tmp_path, embedder, tokenizer, capsys):
    root = tmp_path / "pydocs"
    first = ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    assert "building the Python docs index" in capsys.readouterr().out
    assert sorted(first.sources) == ["pydoc:assert", "pydoc:assignment"]
    assert first.manifest["corpus"] == dict(corpus_identity(), documents=2, limit=2)
    hit = first.search("starred assignment target list", k=1)[0]
    assert hit.chunk.source == "pydoc:assignment"
    again = ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    assert capsys.readouterr().out == ""
    assert again.manifest["version"] == first.manifest["version"]
    assert again.chunks == first.chunks


def test_an_index_of_an_older_corpus_is_updated_keeping_unchanged_vectors(
    tmp_path, embedder, tokenizer, capsys, monkeypatch
):
    """data/old_format/pydocs was written by the covey whose corpus was the topics alone,
    with no `corpus` in its manifest (also what an interrupted first build leaves)."""
    root = tmp_path / "pydocs"
    shutil.copytree(OLD / "pydocs", root)
    old = DocumentIndex.open(root, embedder=embedder, tokenizer=tokenizer)
    assert "corpus" not in old.manifest and sorted(old.sources) == [
        "pydoc:assert",
        "pydoc:assignment",
    ]
    old_vectors = {c.id: old.vectors[i] for i, c in enumerate(old.chunks)}

    index = ensure_default_index(root, limit=3, embedder=embedder, tokenizer=tokenizer)
    out = capsys.readouterr().out
    assert "holds an older corpus definition (or an interrupted build); updating it" in out
    assert index.manifest["corpus"] == dict(corpus_identity(), documents=3, limit=3)
    assert sorted(index.sources) == sorted(d.source for d in default_documents(limit=3))
    kept = [i for i, c in enumerate(index.chunks) if c.id in old_vectors]
    assert len(kept) == len(old.chunks)  # the unchanged topics kept their chunks...
    for i in kept:  # ...and their stored vectors
        assert np.array_equal(index.vectors[i], old_vectors[index.chunks[i].id])

    # The next open asking for no more trusts it; a later corpus definition updates it
    # again, dropping what the corpus (here: the limit) no longer holds.
    assert ensure_default_index(root, limit=3, embedder=embedder, tokenizer=tokenizer).manifest[
        "version"
    ] == index.manifest["version"]
    monkeypatch.setattr(default_corpus, "CORPUS_VERSION", CORPUS_VERSION + 1)
    capsys.readouterr()
    newer = ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    assert f"holds corpus version {CORPUS_VERSION} on Python" in capsys.readouterr().out
    assert newer.manifest["corpus"]["version"] == CORPUS_VERSION + 1
    assert sorted(newer.sources) == ["pydoc:assert", "pydoc:assignment"]
    assert len(newer) == len(old.chunks)
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["corpus"]["version"] == CORPUS_VERSION + 1


def test_a_partial_build_is_trusted_only_for_as_many_documents(
    tmp_path, embedder, tokenizer, capsys
):
    root = tmp_path / "pydocs"
    ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    capsys.readouterr()
    more = ensure_default_index(root, limit=3, embedder=embedder, tokenizer=tokenizer)
    assert "only its first 2 documents; updating it" in capsys.readouterr().out
    assert sorted(more.sources) == sorted(d.source for d in default_documents(limit=3))
    manifest = more.manifest
    assert [corpus_is_current(manifest, n) for n in (1, 3, 4)] == [True, True, False]
    assert not corpus_is_current(manifest)  # a call for the whole corpus completes it
    whole = dict(manifest, corpus=dict(manifest["corpus"], limit=None))
    assert corpus_is_current(whole) and corpus_is_current(whole, 2)
    unsaid = dict(manifest, corpus=dict(corpus_identity(), documents=3))  # before `limit`
    assert not corpus_is_current(unsaid, 3)


def test_limit_is_refused_on_the_default_index(tmp_path, monkeypatch, embedder, tokenizer):
    """The default index is what covey chat, covey search and the server trust as whole."""
    monkeypatch.setenv("COVEY_HOME", str(tmp_path / "home"))
    message = r"limit=2 builds a partial index, but .* is the default index"
    for root in (None, default_index_dir()):
        with pytest.raises(InvalidRequestError, match=message):
            ensure_default_index(root, limit=2, embedder=embedder, tokenizer=tokenizer)
    with pytest.raises(InvalidRequestError, match=message):
        open_pydocs_index(limit=2, embedder=embedder, tokenizer=tokenizer)
    assert not default_index_dir().exists()


@pytest.mark.parametrize("start", ["fresh", "older corpus"])
def test_a_second_builder_waits_for_the_first_and_finds_the_index_current(
    tmp_path, embedder, tokenizer, monkeypatch, start
):
    """Two builders at once (two server workers, or covey search next to covey serve after
    an upgrade): the second waits for the first instead of failing on its commit (the index
    changed under it) or on create (the index exists), and then ingests nothing. Two
    threads stand in for the processes: each opens the lock file itself, and flock locks
    of separate opens exclude each other within one process too."""
    root = tmp_path / "pydocs"
    if start == "older corpus":
        shutil.copytree(OLD / "pydocs", root)
    filled: list[str] = []
    both_filling = threading.Event()
    real_fill = default_corpus.fill_index

    def fill(*args, **kwargs):
        # hold the first builder until the second also reaches its fill, or has waited a
        # second (it waits on the build lock): without the lock both fill at once
        filled.append(threading.current_thread().name)
        if len(filled) == 2:
            both_filling.set()
        both_filling.wait(timeout=1.0)
        real_fill(*args, **kwargs)

    monkeypatch.setattr(default_corpus, "fill_index", fill)
    results: dict[str, object] = {}

    def build(name: str) -> None:
        try:
            results[name] = ensure_default_index(
                root, limit=2, progress=False, embedder=embedder, tokenizer=tokenizer
            )
        except Exception as exc:  # reported by the assertion below
            results[name] = exc

    threads = [threading.Thread(target=build, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = {n: r for n, r in results.items() if isinstance(r, Exception)}
    assert errors == {} and len(results) == 2
    assert len(filled) == 1  # the second found the first's index current
    versions = {r.manifest["version"] for r in results.values()}
    assert len(versions) == 1
    assert sorted(results["a"].sources) == ["pydoc:assert", "pydoc:assignment"]


@pytest.fixture(scope="module")
def eval_home(tmp_path_factory, embedder, tokenizer):
    """A COVEY_HOME whose default index is complete for this corpus definition, over the
    evaluation subset (the whole corpus takes minutes to embed on 2 cores)."""
    home = tmp_path_factory.mktemp("eval-home")
    index = DocumentIndex.create(
        home / "indexes" / "pydocs", embedder=embedder, tokenizer=tokenizer
    )
    fill_index(index, evaluation_subset(DISTRACTORS))
    return home, index


def test_evaluation_hit_at_3(eval_home):
    """hit@3 over the evaluation questions, default (hybrid) search. On this subset it
    measured 0.85 (41 of 48; vector alone 0.94, BM25 alone 0.73); on the whole corpus
    (benchmarks/retrieval.py, 2967 chunks, more near misses) 0.73. The bar, 39 of 48, is
    two questions below the measured figure: a change to the documents or the search that
    loses more than two answers fails, a tie broken differently on another machine does
    not. The old topics-only corpus answers one question (`try`) by construction."""
    _, index = eval_home
    results = evaluate(index, k=3)
    assert len(results) == len(QUESTIONS) >= 30
    misses = [(r.question, r.found) for r in results if r.rank is None]
    assert hit_rate(results) >= MIN_HIT_AT_3, misses


def test_covey_search_finds_open(eval_home, monkeypatch, capsys):
    home, _ = eval_home
    monkeypatch.setenv("COVEY_HOME", str(home))
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", ("covey.cli.retrieval_commands",))
    assert cli_main.main(["search", "how do I open a file", "-k", "3"]) == 0
    out = capsys.readouterr().out
    ranked = [line.split()[2] for line in out.splitlines() if line[:1].isdigit()]
    assert "pydoc:builtins.open" in ranked, out
    assert "building" not in out  # the complete index was opened, not rebuilt


def test_stdlib_documents_of_chosen_modules(caplog):
    """A module this Python lacks (a build without sqlite3) is left out, and said so."""
    docs = stdlib_documents(("json", "covey_no_such_module"))
    assert {d.source for d in docs} >= {"pydoc:json.dumps", "pydoc:json.JSONDecoder.decode"}
    assert all(d.source.startswith("pydoc:json.") for d in docs)
    assert "the Python docs corpus leaves out covey_no_such_module" in caplog.text
