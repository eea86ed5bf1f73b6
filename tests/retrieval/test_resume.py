"""A long ingest killed with SIGKILL between checkpoints resumes: the re-run embeds only the
chunks no checkpoint holds, and ends with every chunk indexed once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from covey.retrieval.chunker import ChunkerConfig, chunk_document
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document

CHECKPOINT = 5
WRITER = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from covey.retrieval.document_index import DocumentIndex
from covey.retrieval.documents import Document
from covey.retrieval.embedder import bundled_model_dir
from covey.retrieval.tokenizers import HFTokenizerAdapter
hf = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
tok = HFTokenizerAdapter(hf, "all-MiniLM-L6-v2")
index = DocumentIndex.open(sys.argv[1], tokenizer=tok)
doc = Document(Path(sys.argv[2]).read_text(), "long.txt")
index.add_documents([doc], checkpoint_chunks=int(sys.argv[3]))
"""
ANIMALS = "otters herons lynxes walruses ibises bison geckos marmots cranes tapirs".split()


def long_text() -> str:
    """About 30 short chunks, every sentence (so every chunk) distinct."""
    return " ".join(f"Note {i}: {ANIMALS[i % 10]} seen {i % 13} times." for i in range(60))


def checkpointed(root: Path) -> int:
    """Chunks of long.txt the last committed checkpoint holds (0 before the first)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0
    return (manifest.get("partial") or {}).get("long.txt", {}).get("chunks", 0)


def test_sigkill_between_checkpoints_then_rerun(tmp_path, make_index, embedder, tokenizer):
    index = make_index(chunker=ChunkerConfig(chunk_tokens=24, overlap_tokens=4))
    text_file = tmp_path / "long.txt"
    text_file.write_text(long_text())
    doc = Document(long_text(), "long.txt")
    expected = chunk_document(doc, tokenizer, index.chunker)
    assert len(expected) >= 5 * CHECKPOINT

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get(
        "PYTHONPATH", ""
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(index.root), str(text_file), str(CHECKPOINT)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while checkpointed(index.root) == 0:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint was ever committed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # The checkpoint is a consistent version holding a prefix of the document.
    survivor = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    held = len(survivor)
    assert survivor.warnings == [] and survivor.partial["long.txt"]["chunks"] == held
    assert 0 < held < len(expected)  # killed mid-ingest, for real
    assert [c.id for c in survivor.chunks] == [c.id for c in expected[:held]]
    assert "long.txt" not in survivor.sources  # unfinished: the re-run must not skip it

    stats = survivor.add_documents([doc], checkpoint_chunks=CHECKPOINT)
    assert stats.added_chunks == len(expected)
    assert stats.reused_vectors == held  # the checkpoint's work is kept ...
    assert stats.embedded_chunks == len(expected) - held  # ... and only the rest is embedded
    assert stats.embedded_chunks < len(expected)
    assert stats.checkpoints == (len(expected) - 1) // CHECKPOINT

    final = DocumentIndex.open(index.root, embedder=embedder, tokenizer=tokenizer)
    assert final.partial == {} and final.sources["long.txt"] == survivor.sources["long.txt"]
    assert [(c.id, c.start) for c in final.chunks] == [(c.id, c.start) for c in expected]
    rows = [0, held - 1, held, len(expected) - 1]  # both sides of the resume point
    fresh = embedder.embed([expected[i].text for i in rows])
    np.testing.assert_allclose(final.vectors[rows], fresh, atol=1e-4)
    again = final.add_documents([doc])
    assert (again.unchanged, again.embedded_chunks) == (1, 0)
