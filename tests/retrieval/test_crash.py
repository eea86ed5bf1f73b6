"""A writer killed with SIGKILL mid-commit must leave the previous index intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.store import PAUSE_ENV

WRITER = """
import sys
from transformers import AutoTokenizer
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.embedder import bundled_model_dir
from covey.retrieval.tokenizers import HFTokenizerAdapter
hf = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
tok = HFTokenizerAdapter(hf, "all-MiniLM-L6-v2")
index = DocumentIndex.open(sys.argv[1], tokenizer=tok)
index.add_texts(["Zebras migrate across the savanna every year."], source="new")
index.add_texts(["The old note about volcanoes was rewritten."], source="old")
"""


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("writer never reached the commit point")
        time.sleep(0.05)


def test_sigkill_mid_commit_leaves_old_index(tmp_path, make_index, embedder, tokenizer):
    index = make_index()
    index.add_texts(["Volcanoes erupt when magma rises through the crust."], source="old")
    before = [(r.chunk.id, r.score) for r in index.search("lava and magma", k=3)]
    manifest_before = (index.root / "manifest.json").read_bytes()

    marker = tmp_path / "paused"
    env = dict(os.environ, **{PAUSE_ENV: str(marker)})
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(index.root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(marker, proc)
        temp = [p for p in (index.root / "versions").iterdir() if p.name.startswith(".tmp-")]
        assert temp and (temp[0] / "chunks.sqlite").is_file()  # killed mid-write, for real
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert (index.root / "manifest.json").read_bytes() == manifest_before
    survivor = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    assert [(r.chunk.id, r.score) for r in survivor.search("lava and magma", k=3)] == before
    assert list(survivor.sources) == ["old"]
    assert not survivor.search("zebras savanna", k=3, mode="bm25")

    # The next commit sweeps the dead writer's temporary folder away.
    survivor.add_texts(["Glaciers carve valleys slowly."], source="ice")
    names = [p.name for p in (index.root / "versions").iterdir()]
    assert not [n for n in names if n.startswith(".tmp-")]
    assert len(DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)) == 2
