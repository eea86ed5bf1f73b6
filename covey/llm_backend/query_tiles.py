"""True-position attention for a prefill run over cached keys, cut into query tiles.

A query at position p sees its sequence's keys at positions <= p. One SDPA call with a mask
over all [n, L] pairs pays for every masked-out pair: the CPU flash kernel skips nothing
under an explicit mask, so the upper triangle of a chunked-prefill continuation (and of a
blend run's recomputed rows) costs as much as the keys it does see, 2-3x a full prefill's
causal attention. Cutting the queries (sorted by position) into tiles, each attending only
to keys up to its own last query, skips nearly all of that triangle; only each tile's own
stripe stays masked. The masks are additive and built once per run (not per layer), in the
dtype of the scores they are added to: float32 for tile_attention.py's matmuls, else the
queries' dtype, which SDPA would otherwise convert a boolean mask to on every call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Rows per tile. On CPU in bf16 the tiles are batched matmuls (tile_attention.py): 32, 48
# and 64 rows came within noise of each other there (one thread, CPU time, interleaved on a
# loaded machine; a blend's 250 rows over 1300 keys: 6.4 / 6.5 / 6.7 ms a layer, 512 rows
# after 512 keys: 12.8 / 12.1 / 12.2 ms), and 16 rows were 5-15% slower. Elsewhere SDPA's
# flash kernel does a tile: it cuts up to 191 queries into blocks of 32, so a 37-query tile
# pays for a 5-row block nearly as much as for a full one (a blend's ~220 rows: 32-row tiles
# 6.9 ms a layer, 37-row: 7.9 ms, one masked call: 9.7 ms, bf16, one thread).
TILE_ROWS = 32
# A cap on tiles per layer for long runs (tiles grow by TILE_ROWS): with the matmuls, 8 (so
# longer tiles) was 5-9% slower than 16 for 1024 rows after 256 keys and for 400 blend rows
# over 2000 keys, 4% faster for 512 rows after 512 keys (same measurement).
MAX_TILES = 16
# Tiles must skip at least this share of the [n, L] pairs, else one call does the run: a few
# queries after a long prefix skip almost nothing and would pay for the extra calls (flash
# kernel: 64 queries after 1-2k keys, 2-6% slower in two tiles; matmuls: 64 after 1000 keys,
# 2.19 ms in one tile, 2.21 in two; 128 after 1000: 4.7 against 4.5 in four, within noise).
MIN_SKIPPED = 0.1


@dataclass
class QueryTile:
    """Rows [start, end) of a run, attending to keys [0, keys) under an additive mask."""

    start: int
    end: int
    keys: int
    mask: torch.Tensor  # [end - start, keys]: 0 where a key is seen, -inf past the row's position
    visible: int = 0  # every row sees keys [0, visible): the mask hides none of them

    @functools.cached_property
    def stripe(self) -> torch.Tensor:
        """The mask's columns that may hide a key, [end - start, keys - visible] (a view):
        those past the tile's first query position, hidden from some of its rows only."""
        return self.mask[:, self.visible :]


@dataclass
class RunPlan:
    """How one prefill run over cached keys reads them and which queries go together."""

    length: int  # keys [0, length) are read: up to the last query's position
    contiguous_start: int | None  # the first pool slot when the blocks lie in pool order
    tiles: list[QueryTile]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The query positions of a true-position mask ([n, L], row i allows keys 0..p_i), or
    None when `mask` is not of that form, or not boolean (it is then applied as given)."""
    if mask.dtype != torch.bool:
        return None
    counts = mask.sum(dim=1)  # [n]: p_i + 1
    if bool((counts == 0).any()):
        return None
    allowed = torch.arange(mask.shape[1], device=mask.device)[None, :] < counts[:, None]
    if not torch.equal(allowed, mask):
        return None
    return counts - 1


def plan_run(
    positions: torch.Tensor, key_blocks: torch.Tensor, block_size: int, dtype: torch.dtype
) -> RunPlan:
    """Tile the queries at `positions` ([n], ascending for the tiles to skip much; any order
    is correct) over the keys held by `key_blocks`."""
    n = positions.shape[0]
    device = positions.device
    pos = positions.tolist()
    length = max(pos) + 1
    num_blocks = -(-length // block_size)
    if key_blocks.shape[0] < num_blocks:
        raise ValueError(
            f"a prefill run's queries reach position {length - 1} but its {key_blocks.shape[0]}"
            f" blocks hold only {key_blocks.shape[0] * block_size} keys"
        )
    used = key_blocks[:num_blocks]
    first = int(used[0])
    in_order = torch.equal(used, torch.arange(first, first + num_blocks, device=used.device))
    rows = TILE_ROWS * -(-n // (TILE_ROWS * MAX_TILES))
    bounds = [(start, min(n, start + rows)) for start in range(0, n, rows)]
    keys_of = [max(pos[a:b]) + 1 for a, b in bounds]
    pairs = sum((b - a) * keys for (a, b), keys in zip(bounds, keys_of, strict=True))
    if pairs > (1 - MIN_SKIPPED) * n * length:
        bounds, keys_of = [(0, n)], [length]
    tiles = []
    for (start, end), keys in zip(bounds, keys_of, strict=True):
        hidden = torch.arange(keys, device=device)[None, :] > positions[start:end, None]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=device)
        mask.masked_fill_(hidden, float("-inf"))
        tiles.append(QueryTile(start, end, keys, mask, min(pos[start:end]) + 1))
    return RunPlan(length, first * block_size if in_order else None, tiles)
