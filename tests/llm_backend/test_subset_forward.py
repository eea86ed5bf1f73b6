"""The forward that blended chunk reuse needs: recompute chosen positions on top of pool KV."""

from __future__ import annotations

import torch

from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.sampling_params import SamplingParams


def test_recomputing_a_subset_of_positions_matches_the_full_prefill(make_engine, device):
    engine = make_engine(enable_prefix_caching=False)
    ids = engine.tokenizer.encode("Retrieved chunks are reused at new positions. " * 3)
    engine.add_request(ids, SamplingParams(max_tokens=1), request_id="r")
    seq = engine.requests["r"]
    plan = engine.scheduler.schedule()
    inputs = engine.runner.prepare(plan.scheduled)
    with torch.inference_mode():
        full = engine.model(inputs.input_ids, inputs.positions, engine.pool.kv, inputs.meta)
    seq.num_computed_tokens = len(ids)

    chosen = torch.tensor([3, 10, len(ids) - 1], device=device)
    bs = engine.pool.block_size
    blocks = torch.tensor(seq.block_table, device=device)
    slots = blocks[chosen // bs] * bs + chosen % bs
    mask = torch.arange(len(ids), device=device)[None, :] <= chosen[:, None]  # [3, L]
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode=0,
        block_size=bs,
        prefills=[PrefillRun(0, len(chosen), blocks, mask)],
    )
    token_ids = torch.tensor(ids, device=device)[chosen]
    with torch.inference_mode():
        subset = engine.model(token_ids, chosen, engine.pool.kv, meta)
    torch.testing.assert_close(subset, full[chosen], atol=1e-4, rtol=1e-4)
    engine.abort_request("r")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
