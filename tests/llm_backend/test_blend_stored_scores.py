"""Blend with scores stored with each chunk (EngineConfig.blend_stored_scores), real SmolLM2.

A blend whose reused chunks all carry scores from earlier blends must run no check layer:
layer 0 computes only the region's own tokens and the chosen ones. A blend with no scored
chunk runs the check layers and stores their scores with every chunk it reused; one with
some scored chunks runs them over the unscored chunks only (test_blend_partial_check). A changed
chunk's scores are never reused; scores are measured again after SCORES_REFRESH_USES uses;
a failure to store scores never fails the request; prefix caching on changes none of it;
the pool returns to its baseline. (Ratio 1.0 never consults scores: test_chunk_cache covers
it.)
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

import covey.cache.chunk_store as chunk_store
from covey.cache.chunk_store import ROOT_HASH, ChunkKV, ChunkStore
from covey.errors import ConfigError
from covey.llm_backend.blend_forward import per_chunk_normalised, shares
from covey.llm_backend.chunk_planner import KVImport, record_scores
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from tests.llm_backend.conftest import numbered_chunk_prompt

ONE = SamplingParams(max_tokens=1, temperature=0.0)  # prefill only: no decode step runs
DOCS = {
    "mill": " The mill by the river grinds wheat for the whole valley in autumn.",
    "lamp": " Lamp oil was sold at the harbour store, two coins a bottle, on Fridays.",
    "owl": " An owl nests in the bell tower; the sexton feeds it mice he catches.",
    "bell": " The bell was cast in the year of the flood and rings at every dusk.",
}


def _prompt(order, head, docs=DOCS):
    return numbered_chunk_prompt(order, head, docs)


class LayerRows:
    """The rows each call of layer `index` computes (a forward pre-hook on the real model)."""

    def __init__(self, engine, index):
        self.calls: list[int] = []
        self._hook = engine.model.layers[index].register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.calls.append(int(args[0].shape[0]))

    def close(self):
        self._hook.remove()


def _run(engine, prompt, params=ONE):
    rid = engine.add_request(prompt, params)
    return engine.run_to_completion([rid])[0]


def _blend_rows(engine, prompt):
    """Run `prompt`; (its output, the rows layer 0 and layer 8 computed in its blend run,
    the blend region's length). The blend is the prompt's last forward of layer 0."""
    layer0, layer8 = LayerRows(engine, 0), LayerRows(engine, 8)
    try:
        out = _run(engine, prompt)
    finally:
        layer0.close()
        layer8.close()
    ids, spans = engine.tokenize(prompt)
    first_chunk = next(s.start for s in spans if s.kind == "chunk")
    return out, layer0.calls[-1], layer8.calls[-1], len(ids) - first_chunk


def _baseline(engine):
    bm = engine.block_manager
    assert not engine.requests
    assert bm.num_free_blocks == bm.num_blocks
    assert not any(bm.ref_counts)


def _entries(engine, name):
    ids = engine.tokenize([Segment(DOCS[name], kind="chunk", chunk_id=name)])[0]
    return engine.chunk_store.get_any(name, ids)


def _stored_engine(make_engine, **config):
    return make_engine(
        kv_cache_tokens=1024,
        chunk_cache="blend",
        blend_recompute_ratio=0.25,
        blend_stored_scores=True,
        **config,
    )


def test_scored_chunks_skip_the_check_layers(make_engine):
    engine = _stored_engine(make_engine, enable_prefix_caching=False)
    counters = engine.chunk_planner.counters
    _run(engine, _prompt(["mill", "lamp", "owl"], "Read the notes.\n"))
    assert _entries(engine, "mill").scores is None  # computed, never blended yet

    # First blend: no chunk has scores, so the check layers run over every region row...
    out, rows0, rows8, region = _blend_rows(engine, _prompt(["owl", "mill", "lamp"], "Notes:\n"))
    assert counters.checked_blends == 1 and counters.stored_score_blends == 0
    assert rows0 == region  # every token computed up to the check layer
    own = region - out.metrics.num_reused_tokens
    assert rows8 == region and out.metrics.num_recomputed_tokens > 0
    # ...and their scores are stored with each reused chunk, normalised to mean 1.
    for name in ("mill", "lamp", "owl"):
        scores = _entries(engine, name).scores
        assert scores is not None and scores.dtype == torch.float16
        assert not torch.isnan(scores).any()
        assert abs(float(scores.float().mean()) - 1.0) < 0.05

    # Second blend, every chunk scored: layer 0 computes only own + chosen rows.
    out, rows0, rows8, region = _blend_rows(engine, _prompt(["lamp", "owl", "mill"], "Facts:\n"))
    assert counters.checked_blends == 1 and counters.stored_score_blends == 1
    own = region - out.metrics.num_reused_tokens
    assert out.metrics.num_recomputed_tokens == -(-out.metrics.num_reused_tokens // 4)
    assert rows0 == rows8 == own + out.metrics.num_recomputed_tokens < region

    # A region with one unscored chunk (bell, stored by a compute) runs a partial check: the
    # check layers compute bell's rows, not the scored chunks' (whose share of the chosen
    # rows their stored scores pick before layer 0), and bell is scored afterwards.
    _run(engine, _prompt(["bell"], "Read the notes.\n"))
    assert _entries(engine, "bell").scores is None
    out, rows0, rows8, region = _blend_rows(engine, _prompt(["mill", "bell", "owl"], "Notes:\n"))
    assert counters.checked_blends == 2 and counters.stored_score_blends == 1
    assert counters.partly_checked_blends == 1
    bell = len(_entries(engine, "bell").token_ids)
    reused, chosen = out.metrics.num_reused_tokens, out.metrics.num_recomputed_tokens
    by_stored = int(shares(torch.tensor([reused - bell, bell]), chosen)[0])
    assert rows0 == rows8 == region - reused + bell + by_stored < region
    assert not torch.isnan(_entries(engine, "bell").scores).any()
    _baseline(engine)


def test_a_changed_chunk_does_not_reuse_the_old_scores(make_engine):
    engine = _stored_engine(make_engine, enable_prefix_caching=False)
    counters = engine.chunk_planner.counters
    _run(engine, _prompt(["mill", "owl"], "Read the notes.\n"))
    _run(engine, _prompt(["owl", "mill"], "Notes:\n"))
    assert counters.checked_blends == 1  # both chunks are scored now
    changed = {**DOCS, "mill": " The mill by the lake grinds barley for the village in spring."}
    # The new mill is computed and stored unscored (the old one dropped as stale); owl,
    # after it, blends by its stored scores.
    _run(engine, _prompt(["mill", "owl"], "Read the notes.\n", changed))
    assert engine.chunk_store.stats()["host"]["stale"] >= 1
    assert counters.checked_blends == 1 and counters.stored_score_blends == 1
    old = engine.tokenize([Segment(DOCS["mill"], kind="chunk", chunk_id="mill")])[0]
    assert engine.chunk_store.get_any(None, old) is None  # no chunk_id: no stale drop
    new = engine.tokenize([Segment(changed["mill"], kind="chunk", chunk_id="mill")])[0]
    assert engine.chunk_store.get_any("mill", new).scores is None
    _run(engine, _prompt(["owl", "mill"], "Facts:\n", changed))
    assert counters.checked_blends == 2 and counters.stored_score_blends == 1
    _baseline(engine)


def test_the_knob_is_checked():
    with pytest.raises(ConfigError, match="blend_stored_scores"):
        EngineConfig(blend_stored_scores="yes")


def test_stored_scores_blend_with_prefix_caching_on(make_engine):
    engine = _stored_engine(make_engine, enable_prefix_caching=True)
    counters = engine.chunk_planner.counters
    _run(engine, _prompt(["mill", "lamp", "owl"], "Read the notes.\n"))
    _run(engine, _prompt(["owl", "mill", "lamp"], "Notes:\n"))
    assert counters.checked_blends == 1 and counters.stored_score_blends == 0
    out, rows0, rows8, region = _blend_rows(engine, _prompt(["lamp", "owl", "mill"], "Facts:\n"))
    assert counters.checked_blends == 1 and counters.stored_score_blends == 1
    own = region - out.metrics.num_reused_tokens
    assert rows0 == rows8 == own + out.metrics.num_recomputed_tokens < region
    assert out.finish_reason != "error"
    _baseline(engine)


def test_scores_are_measured_again_after_some_uses(make_engine, monkeypatch):
    """REVIEW-blend15 M4: stored scores would otherwise choose every later blend forever."""
    monkeypatch.setattr(chunk_store, "SCORES_REFRESH_USES", 1)
    engine = _stored_engine(make_engine, enable_prefix_caching=False)
    counters = engine.chunk_planner.counters
    _run(engine, _prompt(["mill", "owl"], "Read the notes.\n"))
    _run(engine, _prompt(["owl", "mill"], "Notes:\n"))  # measures both
    _run(engine, _prompt(["mill", "owl"], "Facts:\n"))  # by stored scores (use 1)
    assert counters.checked_blends == 1 and counters.stored_score_blends == 1
    before = _entries(engine, "owl").scores.clone()
    _run(engine, _prompt(["owl", "mill"], "Notes below.\n"))  # used up: measured again
    assert counters.checked_blends == 2 and counters.stored_score_blends == 1
    assert not torch.equal(_entries(engine, "owl").scores, before)  # a new one averaged in
    _run(engine, _prompt(["mill", "owl"], "More facts:\n"))  # fresh again
    assert counters.checked_blends == 2 and counters.stored_score_blends == 2
    _baseline(engine)


def test_a_failure_storing_scores_does_not_fail_the_request(make_engine, monkeypatch, caplog):
    """REVIEW-blend15 M5: the forward succeeded; scores are only a hint."""
    engine = _stored_engine(make_engine, enable_prefix_caching=False)
    _run(engine, _prompt(["mill", "owl"], "Read the notes.\n"))
    calls = []

    def broken(entry, offset, scores):
        calls.append(entry.key)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(engine.chunk_store, "update_scores", broken)
    out = _run(engine, _prompt(["owl", "mill"], "Notes:\n"))
    assert out.finish_reason != "error" and out.error is None
    assert out.metrics.num_reused_tokens > 0
    assert len(calls) == 1  # tried once: no retry of the step, no second recording
    assert "storing scores failed" in caplog.text
    _baseline(engine)


def test_benchmark_systems_say_whether_scores_are_stored():
    """REVIEW-blend15 M3: each rag_kv system sets blend_stored_scores itself, so its name
    keeps its meaning whatever the engine's default."""
    path = Path(__file__).parents[2] / "benchmarks" / "rag_kv.py"
    rag_kv = runpy.run_path(str(path), run_name="rag_kv_under_test")
    systems = rag_kv["systems"]((0.0, 0.15))
    blends = {name: c for name, c in systems.items() if c.get("chunk_cache") == "blend"}
    assert blends and all("blend_stored_scores" in c for c in blends.values())
    for name, config in blends.items():
        assert config["blend_stored_scores"] == name.endswith("-stored"), name
    assert rag_kv["blend_variant"]("ratio=0.15,check=12")[1]["blend_stored_scores"] is False
    assert rag_kv["blend_variant"]("stored=1")[1]["blend_stored_scores"] is True


def test_only_whole_chunk_measurements_are_recorded():
    """REVIEW-blend15 L2: a part of a chunk (an import starting inside it, or one whose end
    was trimmed) is normalised over the part, a scale that does not mix with whole-chunk
    scores: nothing is recorded for it."""
    store = ChunkStore(1 << 20, float)
    a, b, c = (
        ChunkKV(name, tuple(range(10 * i, 10 * i + 4)), torch.randn(2, 2, 1, 4, 4), 0, ROOT_HASH)
        for i, name in enumerate("abc", start=1)
    )
    for entry in (a, b, c):
        assert store.put(entry)
    imports = [
        KVImport(0, 4, a, 0, 5),  # whole
        KVImport(4, 7, b, 1, 5),  # starts inside b (after a prefix-cache hit)
        KVImport(7, 10, c, 0, 5),  # c's last token trimmed
    ]
    record_scores(store, imports, 0, torch.arange(1.0, 11.0))
    assert store.get_any("a", a.token_ids).scores.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert store.get_any("b", b.token_ids).scores is None
    assert store.get_any("c", c.token_ids).scores is None


def test_a_measurement_that_ranks_nothing_is_stored_as_unknown():
    """REVIEW-blend15 L1: a NaN or inf row, or no deviation at all, makes that chunk's
    scores unknown (NaN) instead of raw or zero values; other chunks are unaffected."""
    nan, inf = float("nan"), float("inf")
    score = torch.tensor([0.01, 0.02, nan, 1.0, 3.0, 0.5, inf, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    out = per_chunk_normalised(score, groups)
    assert out[[0, 1, 2, 5, 6, 7, 8]].isnan().all()
    assert out[3:5].tolist() == [0.5, 1.5]
