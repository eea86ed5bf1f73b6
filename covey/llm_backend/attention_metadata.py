"""What one forward step needs to know about attention, built by the model runner.

A step's tokens are flattened: decode tokens (one per sequence) first, then prefill runs.
New keys are written by *slot* and read back by whole *block* (a few large copies instead
of many small ones); a query attends to the keys of its sequence
whose logical position is <= its own, which also serves a forward over any subset of
positions on top of KV that is already in the pool (blended chunk reuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillRun:
    """One sequence's query tokens `[start, end)` of the flat batch."""

    start: int
    end: int
    key_blocks: torch.Tensor | None  # [nb] pool blocks holding positions 0..L-1; None: fresh
    mask: torch.Tensor | None  # [n, L] bool, True where attention is allowed; None: causal


@dataclass
class DecodeGroup:
    """Decode rows `[start, end)` of the flat batch, whose keys are read in one batch.

    Rows are grouped by key length so that no sequence is padded far past its own keys:
    each group pads only to its own longest table.
    """

    start: int
    end: int
    blocks: torch.Tensor | None  # [n, MB] each row's pool blocks (padded); None: contiguous
    length: int  # keys of the longest row: rows see keys [0, length) at most
    padding: torch.Tensor | None  # [1, n, 1, length] bool, True past a row's end; None: none
    contiguous_start: int | None = None  # one row whose keys are pool slots [s, s + length)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decodes
    block_size: int
    prefills: list[PrefillRun]
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # cover rows [0, num_decode)
