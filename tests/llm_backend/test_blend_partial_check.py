"""Partial check: a blend whose reused chunks are partly scored, real SmolLM2.

The scored chunks' share of the chosen rows is picked by their stored scores before layer 0;
the check layers compute the own, forced, pre-chosen and unscored rows only, and measure the
unscored ones. The scored chunks' scores are left as they were (their refresh count runs on),
the unscored ones get theirs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import covey.cache.chunk_store as chunk_store
from covey.cache.chunk_kv import ROOT_HASH, ChunkKV
from covey.llm_backend.blend_forward import BlendPolicy, blend_forward, shares
from covey.llm_backend.chunk_planner import ChunkPlan, ChunkPlanner, KVImport, Piece, num_selected
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import Sequence
from tests.llm_backend.test_blend_forward import _setup
from tests.llm_backend.test_blend_stored_scores import (
    LayerRows,
    _baseline,
    _entries,
    _prompt,
    _run,
    _stored_engine,
)

LAYERS, CHECK = 30, (1,)


def _blend_steps(monkeypatch, planner):
    """The blend steps `planner` takes from now on (a list that fills as they are taken)."""
    steps = []
    take = planner.take

    def recording(*args, **kwargs):
        step = take(*args, **kwargs)
        if step is not None and step.blend is not None:
            steps.append(step)
        return step

    monkeypatch.setattr(planner, "take", recording)
    return steps


def _scored_mill_and_owl(make_engine, monkeypatch):
    """An engine whose refresh is due after one stored use, with mill and owl stored and
    scored by a full check: (engine, counters, store, planner)."""
    monkeypatch.setattr(chunk_store, "SCORES_REFRESH_USES", 1)
    engine = _stored_engine(make_engine, enable_prefix_caching=False)
    planner = engine.chunk_planner
    _run(engine, _prompt(["mill", "owl"], "Read the notes.\n"))
    _run(engine, _prompt(["owl", "mill"], "Notes:\n"))  # a full check: both scored
    return engine, planner.counters, engine.chunk_store, planner


def test_a_partly_scored_blend_checks_only_its_unscored_chunk(make_engine, monkeypatch):
    engine, counters, store, planner = _scored_mill_and_owl(make_engine, monkeypatch)
    _run(engine, _prompt(["bell"], "Read the notes.\n"))  # bell stored, unscored
    assert counters.checked_blends == 1 and counters.partly_checked_blends == 0
    before = {name: _entries(engine, name).scores.clone() for name in ("mill", "owl")}
    assert all(store.scores_fresh(_entries(engine, name)) for name in ("mill", "owl"))

    steps = _blend_steps(monkeypatch, planner)
    layer0 = LayerRows(engine, 0)
    try:
        out = _run(engine, _prompt(["mill", "bell", "owl"], "Facts:\n"))
    finally:
        layer0.close()
    assert counters.checked_blends == 2 and counters.partly_checked_blends == 1
    assert counters.stored_score_blends == 0
    step = steps[-1]
    assert step.checked and step.partly_checked and not step.by_stored
    assert step.scored == (True, False, True)
    # charged the check layers over bell's tokens only
    bell = len(_entries(engine, "bell").token_ids)
    own = step.blend.end - step.blend.start - out.metrics.num_reused_tokens
    check = math.ceil(planner.check_fraction * bell)
    before_blend = sum(hi - lo for lo, hi in step.compute)  # the head, computed in the step
    assert step.cost == before_blend + own + step.num_recomputed + check
    scored_share = int(
        shares(torch.tensor([out.metrics.num_reused_tokens - bell, bell]), step.num_recomputed)[0]
    )
    assert layer0.calls[-1] == own + bell + scored_share

    # mill and owl chose rows by their scores: untouched, and now due for a refresh
    for name in ("mill", "owl"):
        entry = _entries(engine, name)
        assert torch.equal(entry.scores, before[name])
        assert not store.scores_fresh(entry)
    scores = _entries(engine, "bell").scores
    assert scores is not None and not torch.isnan(scores).any()
    assert abs(float(scores.float().mean()) - 1.0) < 0.05
    assert store.scores_fresh(_entries(engine, "bell"))
    _baseline(engine)


def test_a_chunk_due_for_a_refresh_is_measured_beside_a_fresh_scored_one(make_engine, monkeypatch):
    """mill has scores but its refresh is due, owl's are fresh: the runner must hand
    blend_forward NaN for mill (it is measured again, in a partial check) and owl's stored
    scores (they choose its rows). The only case where the runner's per-import filter of
    stored scores matters for an entry that has scores."""
    engine, counters, store, planner = _scored_mill_and_owl(make_engine, monkeypatch)
    _run(engine, _prompt(["mill"], "One note:\n"))  # by mill's stored scores: now due
    assert counters.checked_blends == 1 and counters.stored_score_blends == 1
    mill, owl = _entries(engine, "mill"), _entries(engine, "owl")
    assert not store.scores_fresh(mill) and store.scores_fresh(owl)
    before = {"mill": mill.scores.clone(), "owl": owl.scores.clone()}

    steps = _blend_steps(monkeypatch, planner)
    layer0 = LayerRows(engine, 0)
    try:
        out = _run(engine, _prompt(["mill", "owl"], "Facts:\n"))
    finally:
        layer0.close()
    step = steps[-1]
    assert step.scored == (False, True)
    assert step.checked and step.partly_checked and not step.by_stored
    assert counters.checked_blends == 2 and counters.partly_checked_blends == 1
    # the check layers computed mill's rows, not owl's beyond its share of the chosen rows
    n_mill = len(_entries(engine, "mill").token_ids)
    reused = out.metrics.num_reused_tokens
    own = step.blend.end - step.blend.start - reused
    owl_share = int(shares(torch.tensor([reused - n_mill, n_mill]), step.num_recomputed)[0])
    assert layer0.calls[-1] == own + n_mill + owl_share

    mill, owl = _entries(engine, "mill"), _entries(engine, "owl")
    assert not torch.equal(mill.scores, before["mill"])  # measured again, merged in
    assert not torch.isnan(mill.scores).any()
    assert store.scores_fresh(mill)  # the refresh reset its count
    assert torch.equal(owl.scores, before["owl"])  # chose by its scores, not measured
    assert not store.scores_fresh(owl)  # that use counted: owl is due now
    _baseline(engine)


def _noise(engine, region, seed):
    """Random KV over the whole region on every layer; returns it."""
    slots = region.slots
    shape = engine.pool.kv[:, :, :, slots].shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    noise = noise.to(engine.pool.kv.device, engine.pool.kv.dtype)
    engine.pool.kv[:, :, :, slots] = noise
    return noise


def _computed(engine, region, noise, layer):
    """The region rows whose KV `layer` wrote (no longer the noise)."""
    now = engine.pool.kv[layer, :, :, region.slots]
    return set((now != noise[layer]).flatten(0, 1).any(-1).any(0).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize(
    ("ratio", "sinks", "policy"),
    [
        (0.3, 0, BlendPolicy()),
        # one chosen row: one group's share is 0 (no pre-chosen row, or none chosen of B)
        (None, 2, BlendPolicy(score="kv+attention", quota="per_chunk")),
    ],
)
def test_partial_check_computes_the_expected_rows(make_engine, ratio, sinks, policy):
    """A (scored) and B (unscored) reused, each chunk's first `sinks` rows forced, check
    layer 1. Layers 0-1 compute own + forced + B + A's share of k (its top rows by stored
    score); layer 2 on, own + forced + the k chosen; layer 0's KV of every row it computes
    is the full prefill's (it depends on the token alone). `ratio` None: k is 1."""
    engine = make_engine(enable_prefix_caching=False)
    region, _, reference, own, b_all, _ = _setup(engine)
    reused = region.reused.nonzero().squeeze(1).tolist()
    a_all = [r for r in reused if r not in b_all]
    heads = a_all[:sinks] + b_all[:sinks]
    a_rows, b_rows = a_all[sinks:], b_all[sinks:]  # chosen by score
    num_free = len(a_rows) + len(b_rows)
    ratio = 1 / num_free if ratio is None else ratio
    k = num_selected(ratio, num_free)
    k_a, k_b = shares(torch.tensor([len(a_rows), len(b_rows)]), k).tolist()
    assert 0 in (k_a, k_b) if k == 1 else k_a and k_b
    forced = torch.zeros_like(region.reused)
    forced[heads] = True
    stored = torch.full((len(region.reused),), float("nan"))
    stored[a_all] = torch.arange(len(a_all), dtype=torch.float32)  # the last rank first
    top_a = set(a_rows[len(a_rows) - k_a :])
    dev = region.reused.device
    mixed = replace(region, forced=forced, stored_scores=stored.to(dev))

    noise = _noise(engine, region, seed=5)
    result = blend_forward(engine.model, engine.pool.kv, mixed, ratio, (1,), 16, policy)
    assert result.checked and result.num_recomputed == len(heads) + k
    always = set(own) | set(heads) | top_a  # computed on every layer
    checked_rows = always | set(b_rows)
    assert _computed(engine, region, noise, 0) == checked_rows
    assert _computed(engine, region, noise, 1) == checked_rows
    rows = sorted(checked_rows)
    torch.testing.assert_close(
        engine.pool.kv[0, :, :, region.slots[rows]],
        reference[0, :, :, rows],
        atol=1e-4,
        rtol=0,
    )
    later = _computed(engine, region, noise, 2)
    assert always <= later and len(later) == len(own) + len(heads) + k
    assert len(later & set(b_rows)) == k_b
    assert _computed(engine, region, noise, len(engine.model.layers) - 1) == later
    # scores measured for B's rows chosen by score only, normalised to mean 1; A's and the
    # forced rows stay unknown (untouched)
    assert result.scores[a_all + heads + own].isnan().all()
    assert not result.scores[b_rows].isnan().any()
    assert abs(float(result.scores[b_rows].mean()) - 1.0) < 1e-4
    engine.abort_request("full")


def test_mixed_stored_scores_at_ratio_one_bypass_the_partial_check(make_engine):
    """At ratio 1 k is every reused row, so nothing is chosen: mixed stored scores (A scored,
    B not) must not reach the partial branch. No check layer runs, no scores come back, and
    the blend is a full prefill."""
    engine = make_engine(enable_prefix_caching=False)
    region, full_last, reference, own, b_rows, _ = _setup(engine)
    stored = torch.full((len(region.reused),), float("nan"))
    reused = region.reused.nonzero().squeeze(1).tolist()
    stored[[r for r in reused if r not in b_rows]] = 1.0
    _noise(engine, region, seed=6)
    mixed = replace(region, stored_scores=stored.to(region.reused.device))
    result = blend_forward(engine.model, engine.pool.kv, mixed, 1.0, (1,), 16)
    assert not result.checked and result.scores is None
    torch.testing.assert_close(result.hidden, full_last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.pool.kv[:, :, :, region.slots], reference, atol=1e-4, rtol=0)
    engine.abort_request("full")


def _planner_step(chunk_scores, sinks=0, sizes=None):
    """A hand-made plan: own tokens 0-8, then chunks (16 tokens each unless `sizes`; scores
    per chunk: None or a list), then 16 own tokens after them. No model."""
    store = chunk_store.ChunkStore(1 << 20, float)
    planner = ChunkPlanner(store, "blend", 0.25, CHECK, LAYERS, sinks, stored_scores=True)
    imports = []
    pos = 8
    for i, scores in enumerate(chunk_scores):
        n = sizes[i] if sizes else 16
        tensor = None if scores is None else torch.tensor(scores, dtype=torch.float16)
        kv = torch.zeros(1, 2, 1, n, 2)
        entry = ChunkKV(f"c{i}", tuple(range(100 * i, 100 * i + n)), kv, 0, ROOT_HASH, tensor)
        assert store.put(entry)
        imports.append(KVImport(pos, pos + n, entry, offset=0, delta=3))
        pos += n
    end = pos + 16
    seq = Sequence("r", list(range(end)), SamplingParams(max_tokens=1))
    seq.chunk_plan = ChunkPlan([Piece(0, end, "blend", tuple(imports))], [], 0)
    step = planner.take(seq, budget=1000, alone=True)
    assert step is not None and step.blend is not None
    return planner, seq, step


def test_a_partial_check_is_charged_the_check_layers_over_the_unscored_chunks_only():
    planner, seq, step = _planner_step([[1.0] * 16, None, [2.0] * 16])
    assert step.checked and step.partly_checked and not step.by_stored
    assert step.scored == (True, False, True)
    recomputed = math.ceil(0.25 * 48)
    assert step.cost == 24 + recomputed + math.ceil((max(CHECK) + 1) / LAYERS * 16)
    planner.commit(seq, step)
    c = planner.counters
    assert (c.checked_blends, c.partly_checked_blends, c.stored_score_blends) == (1, 1, 0)
    # the stored uses it counts: test_a_partial_check_counts_a_stored_use_of_its_scored_chunks

    # all unscored: a full check, charged over every reused token
    _, _, full = _planner_step([None, None, None])
    assert full.checked and not full.partly_checked and full.scored == (False,) * 3
    assert full.cost == 24 + recomputed + math.ceil((max(CHECK) + 1) / LAYERS * 48)
    # a chunk whose sinks cover it decides nothing, scored or not (blend_forward sees rows):
    # with only unscored others a full check, with only scored others a stored-score blend
    _, _, sunk = _planner_step([None, [1.0] * 4, None], sinks=4, sizes=(16, 4, 16))
    assert sunk.checked and not sunk.partly_checked
    _, _, sunk = _planner_step([[1.0] * 16, None, [1.0] * 16], sinks=4, sizes=(16, 4, 16))
    assert sunk.by_stored and not sunk.checked


def test_a_partial_check_counts_a_stored_use_of_its_scored_chunks(monkeypatch):
    monkeypatch.setattr(chunk_store, "SCORES_REFRESH_USES", 1)
    planner, seq, step = _planner_step([[1.0] * 16, None])
    assert step.partly_checked
    planner.commit(seq, step)
    first, second = (imp.entry for imp in step.blend.imports)
    assert not planner.store.scores_fresh(first) and planner.store.scores_fresh(second)
