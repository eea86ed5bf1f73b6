"""What a prefill costs on this machine: seconds(n) = a + b * n, measured once per process.

The chunk store evicts by PGDSF, whose cost term is the time a recompute would take, so it
needs this machine's prefill speed for the model at hand, not a guess. Two short forward
passes (after one warm-up) into a scratch KV tensor fit the line; the pool is not touched.
The fit is cached per (model, device, dtype, quantization), so engines sharing a model, and
tests building many engines, measure once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.model import LlamaModel

PROFILE_LENGTHS = (16, 64)  # short: the whole measurement stays well under a second

_profiles: dict[tuple[object, ...], PrefillProfile] = {}


@dataclass(frozen=True)
class PrefillProfile:
    fixed_s: float  # per prefill, whatever its length
    per_token_s: float

    def seconds(self, num_tokens: int) -> float:
        """Estimated seconds to prefill `num_tokens` tokens from scratch."""
        return self.fixed_s + self.per_token_s * num_tokens

    def span_seconds(self, num_tokens: int) -> float:
        """What recomputing a span of `num_tokens` costs inside a larger prefill: a span is
        never prefilled alone, so no fixed cost. The chunk store's eviction cost: with the
        fixed part, small label spans would outrank the chunks per byte and outlive them."""
        return self.per_token_s * num_tokens


def prefill_profile(model: LlamaModel, key: tuple[object, ...]) -> PrefillProfile:
    """The cached profile for `key` (what identifies the model's speed), measuring it on
    `model` the first time."""
    profile = _profiles.get(key)
    if profile is None:
        profile = _profiles[key] = measure(model)
    return profile


@torch.inference_mode()
def measure(model: LlamaModel) -> PrefillProfile:
    """Time a forward over each of PROFILE_LENGTHS tokens and fit a line through them."""
    args = model.args
    param = model.norm.weight  # the compute dtype (embeddings may be int8)
    device = param.device
    longest = max(PROFILE_LENGTHS)
    kv = torch.zeros(
        args.num_layers,
        2,
        args.num_kv_heads,
        longest,
        args.dim_per_head,
        dtype=param.dtype,
        device=device,
    )

    def run(n: int) -> float:
        ids = torch.zeros(n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device)
        meta = AttentionMetadata(
            slot_mapping=positions,
            num_decode=0,
            block_size=1,
            decode_blocks=None,
            decode_padding=None,
            prefills=[PrefillRun(0, n, None, None)],
        )
        _sync(device)
        start = time.perf_counter()
        model(ids, positions, kv, meta)
        _sync(device)
        return time.perf_counter() - start

    run(PROFILE_LENGTHS[0])  # warm-up: first-call allocations and kernel selection
    (n0, n1) = PROFILE_LENGTHS
    t0, t1 = run(n0), run(n1)
    per_token = max(t1 - t0, 0.0) / (n1 - n0)
    if per_token == 0.0:  # timing noise: fall back to a proportional model
        per_token = t1 / n1
    return PrefillProfile(fixed_s=max(t0 - per_token * n0, 0.0), per_token_s=per_token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
