"""The fast path of moving chunk KV from the store into the pool, on the real model.

An import writes keys (re-rotated) and values straight into the pool instead of building a
re-rotated copy of the span first; re-rotation works in place on its float32 copy. Both
must give the bits the plain formulas give.
"""

from __future__ import annotations

import pytest
import torch

from covey.cache.chunk_kv import ChunkKV
from covey.llm_backend.chunk_planner import KVImport
from covey.llm_backend.layers import apply_rotary
from covey.llm_backend.rope_rerotation import RopeRerotator
from covey.llm_backend.sampling_params import SamplingParams


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rerotate_gives_apply_rotarys_bits_and_leaves_its_input(make_engine, dtype):
    engine = make_engine(chunk_cache="off", kv_cache_tokens=256)
    rerotator = RopeRerotator(engine.model.args)
    keys = torch.randn(3, 2, 7, engine.model.args.dim_per_head).to(dtype)
    before = keys.clone()
    cos, sin = rerotator.rotation(-41, keys.device)
    want = apply_rotary(keys.float(), cos, sin).to(dtype)
    assert torch.equal(rerotator.rerotate(keys, -41), want)
    assert torch.equal(keys, before)  # float32 keys are copied, not rotated in place


@pytest.mark.parametrize("scattered", [False, True], ids=["blocks-in-order", "scattered"])
@pytest.mark.parametrize("delta", [-98, 0])
def test_import_writes_the_rerotated_span_and_nothing_else(make_engine, delta, scattered):
    """Keys moved by the delta, values as stored, each into its own slot (also where the
    sequence's blocks are not in pool order); every other slot of the pool (neighbours
    sharing the span's first and last blocks) untouched."""
    engine = make_engine(chunk_cache="blend", kv_cache_tokens=512)
    ids = list(range(100, 150))
    engine.add_request(ids, SamplingParams(max_tokens=1), request_id="r")
    engine.scheduler.schedule()  # allocates the sequence's blocks
    seq = engine.requests["r"]
    if scattered:  # the same blocks, out of pool order: the span crosses three of them
        seq.block_table[:] = [seq.block_table[i] for i in (2, 0, 3, 1)]
    pool = engine.pool.kv
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(0)))
    before = pool.clone()
    layers, _, kvh, _, dh = pool.shape
    stored = torch.randn(layers, 2, kvh, 40, dh, generator=torch.Generator().manual_seed(1))
    entry = ChunkKV("c", tuple(range(40)), stored.to(pool.dtype), 2 - delta, "ctx")
    imp = KVImport(start=5, end=37, entry=entry, offset=3, delta=delta)

    transfer = engine.runner.chunks
    transfer.import_kv(seq, imp)

    runs = transfer.slot_runs(seq, 5, 37)
    assert len(runs) == (3 if scattered else 1)
    slots = transfer.slots(seq, 5, 37)
    assert [s for a, b, first in runs for s in range(first, first + b - a)] == slots.tolist()
    want = RopeRerotator(engine.model.args).rerotate_kv(entry.kv[:, :, :, 3:35], delta)
    assert torch.equal(pool[:, :, :, slots], want)
    others = torch.ones(pool.shape[3], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(pool[:, :, :, others], before[:, :, :, others])
    engine.abort_request("r")
