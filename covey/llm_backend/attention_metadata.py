"""What one forward step needs to know about attention, built by the model runner.

A step's tokens are flattened: decode tokens (one per sequence) first, then prefill runs.
New keys are written by *slot* and read back by whole *block* (a few large copies instead
of many small ones); a query attends to the keys of its sequence
whose logical position is <= its own, which also serves a forward over any subset of
positions on top of KV that is already in the pool (blended chunk reuse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillRun:
    """One sequence's query tokens `[start, end)` of the flat batch."""

    start: int
    end: int
    key_blocks: torch.Tensor | None  # [nb] pool blocks holding positions 0..L-1; None: fresh
    mask: torch.Tensor | None  # [n, L] bool, True where attention is allowed; None: causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decodes
    block_size: int
    decode_blocks: torch.Tensor | None  # [D, MB] block table per decode sequence (padded)
    decode_padding: (
        torch.Tensor | None
    )  # [1, D, 1, MB * bs] bool, True past the end; None: no padding
    prefills: list[PrefillRun]
