"""What one forward step needs to know about attention, built by the model runner.

A step's tokens are flattened: decode tokens (one per sequence) first, then prefill runs.
Keys are addressed by *slot* in the paged pool; a query attends to the keys of its sequence
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
    key_slots: torch.Tensor | None  # [L] slots of logical positions 0..L-1; None: fresh only
    mask: torch.Tensor | None  # [n, L] bool, True where attention is allowed; None: causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_slots: torch.Tensor | None  # [D, Lmax] key slots per decode sequence (padded)
    decode_mask: torch.Tensor | None  # [D, 1, 1, Lmax] bool, False on padding
    prefills: list[PrefillRun]
