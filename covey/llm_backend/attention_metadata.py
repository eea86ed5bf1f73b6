"""What one forward step needs to know about attention, built by the model runner.

A step's tokens are flattened: decode tokens (one per sequence) first, then prefill runs.
New keys are written by *slot* and read back by whole *block* (a few large copies instead
of many small ones); a query attends to the keys of its sequence
whose logical position is <= its own, which also serves a forward over any subset of
positions on top of KV that is already in the pool (blended chunk reuse). A run over cached
keys names its queries' positions (or, from older callers, a true-position mask, from which
the positions are read back); how attention then reads the keys is planned once per run
(`RunPlan`, see query_tiles.py), on the first layer, and reused by the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covey.llm_backend.query_tiles import RunPlan, plan_run, positions_from_mask


@dataclass
class PrefillRun:
    """One sequence's query tokens `[start, end)` of the flat batch.

    With `key_blocks` None the run is fresh: its queries are positions 0..n-1 and see only
    their own keys (causal). Otherwise the run reads keys from the pool and names either
    `positions` (each query sees keys at positions <= its own) or a boolean `mask`.
    """

    start: int
    end: int
    key_blocks: torch.Tensor | None  # [nb] pool blocks holding positions 0..L-1; None: fresh
    mask: torch.Tensor | None = None  # [n, L] bool, True where attention is allowed
    positions: torch.Tensor | None = None  # [n] the queries' positions, ascending
    _plans: dict[torch.dtype, RunPlan | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def plan(self, block_size: int, dtype: torch.dtype) -> RunPlan | None:
        """The tiled read of this run's keys (built once), or None for a mask that is not
        a true-position one (applied as given)."""
        if dtype not in self._plans:
            positions = self.positions
            if positions is None:
                if self.key_blocks is None or self.mask is None:
                    raise ValueError(
                        "a prefill run over cached keys needs its queries' positions or a mask"
                    )
                positions = positions_from_mask(self.mask)
            if positions is None or self.key_blocks is None:
                self._plans[dtype] = None
            else:
                self._plans[dtype] = plan_run(positions, self.key_blocks, block_size, dtype)
        return self._plans[dtype]


@dataclass
class DecodeGroup:
    """Decode rows `[start, end)` of the flat batch, whose keys are read in one batch.

    Rows are grouped by key length so that no sequence is padded far past its own keys:
    each group pads only to its own longest table.
    """

    start: int
    end: int
    # [n, MB] each row's pool blocks (padded); None: one row, read in place
    # (`contiguous_start`) or by `spans`
    blocks: torch.Tensor | None
    length: int  # keys of the longest row: rows see keys [0, length) at most
    padding: torch.Tensor | None  # [1, n, 1, length] bool, True past a row's end; None: none
    contiguous_start: int | None = None  # one row whose keys are pool slots [s, s + length)
    # One row whose keys lie in a few stretches of pool order (a prefix-cache hit's blocks,
    # then the sequence's own): their slot ranges [a, b), in key order, `length` keys in all.
    spans: tuple[tuple[int, int], ...] | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decodes
    block_size: int
    prefills: list[PrefillRun]
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # cover rows [0, num_decode)
