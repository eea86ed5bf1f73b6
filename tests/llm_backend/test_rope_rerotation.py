"""A cached key re-rotated from the position it was computed at to another equals the key
computed at that other position (blended chunk reuse moves chunks)."""

from __future__ import annotations

import pytest
import torch

from covey.llm_backend.layers import RotaryEmbedding, apply_rotary
from covey.llm_backend.model_args import ModelArgs, RopeScaling
from covey.llm_backend.rope_rerotation import RopeRerotator
from covey.llm_backend.sampling_params import SamplingParams

LLAMA3_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=1024
)


def _args(scaling: RopeScaling | None) -> ModelArgs:
    return ModelArgs(
        vocab_size=32,
        hidden_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position=8192,
        rope_theta=500000.0,
        rope_scaling=scaling,
    )


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain", "llama3-scaled"])
@pytest.mark.parametrize("old,new", [(3, 700), (700, 3), (0, 5000), (4000, 4001)])
def test_a_rerotated_key_equals_the_key_computed_at_the_new_position(scaling, old, new):
    args = _args(scaling)
    rotary = RotaryEmbedding(args.dim_per_head, args.max_position, args.rope_theta, scaling)
    raw = torch.randn(5, 1, args.dim_per_head, generator=torch.Generator().manual_seed(0))
    at = [torch.arange(p, p + 5) for p in (old, new)]
    key_old, key_new = (apply_rotary(raw, *rotary(pos, torch.float32)) for pos in at)
    moved = RopeRerotator(args).rerotate(key_old, new - old)
    # The model's float32 tables hold p * f to ~6e-8 * p radians: ~3e-4 at p = 5000.
    torch.testing.assert_close(moved, key_new, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(key_old, key_new, atol=1e-3)  # the move is not a no-op


def test_scaling_changes_the_rotation():
    """Re-rotating with unscaled frequencies would be wrong for a scaled model."""
    raw = torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(1))
    plain = RopeRerotator(_args(None)).rerotate(raw, 3000)
    scaled = RopeRerotator(_args(LLAMA3_SCALING)).rerotate(raw, 3000)
    assert not torch.allclose(plain, scaled, atol=1e-3)


def test_rerotate_kv_moves_keys_and_leaves_values(make_engine):
    """On the real model: layer 0's keys of a chunk computed alone at position 0, moved by
    the length of a prefix, equal those computed after that prefix; values are untouched."""
    engine = make_engine(enable_prefix_caching=False, chunk_cache="off")
    tok = engine.tokenizer
    chunk = tok.encode(" The lighthouse keeper counted ships every night until dawn.")
    prefix = tok.encode("A preface of some length, which moves the chunk along.")
    slots = {}
    for name, ids in (("alone", chunk), ("after", prefix + chunk)):
        engine.add_request(ids, SamplingParams(max_tokens=2, ignore_eos=True), request_id=name)
        seq = engine.requests[name]
        engine.step()
        first = len(ids) - len(chunk)
        bs = engine.pool.block_size
        slots[name] = [seq.block_table[p // bs] * bs + p % bs for p in range(first, len(ids))]
    layer0 = engine.pool.kv[0:1]  # [1, 2, KVH, S, Dh]
    alone = layer0[:, :, :, slots["alone"]]
    after = layer0[:, :, :, slots["after"]]
    moved = RopeRerotator(engine.model.args).rerotate_kv(alone, len(prefix))
    torch.testing.assert_close(moved, after, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(alone[:, 0], after[:, 0], atol=1e-3)
    for name in slots:
        engine.abort_request(name)
