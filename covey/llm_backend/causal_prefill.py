"""Causal attention of a fresh prefill run over its own keys, by query tiles of batched matmuls.

A fresh run (a prompt from position 0) was one SDPA call with is_causal. On CPU in bf16 the
flash kernel runs at a fraction of oneDNN's batched matmul speed: a 512-token run of the
embedded model (9 query heads over 3 KV heads, head size 64) took 14-16 ms a layer there,
one thread, against 6-8 ms here; 1024 tokens: 41 against 25 ms; 96 tokens: 0.34 against
0.26 ms (interleaved on a loaded machine). Attention was over a third of a 512-token
prefill, the same share for transformers, which calls the same kernel.

An earlier batched-matmul prefill was reverted (commit 30828b6) because it kept the scores
in bf16: rounded to 8 significant bits, a score of 20 moves by up to 0.06, its softmax
weight by up to 6%, and that cost the int8 mode its 1% perplexity bound. Here the scores
are float32, as in the flash kernel (upcasting queries and keys costs little: they are
small next to the scores); the probabilities are rounded to bf16 for the product with the
values, as the flash kernel also does. Against a float32 reference on random inputs the
output error is 1.26x the flash kernel's, where bf16 scores were 5-7x. Perplexity of the
embedded model (one 128-token window, when its test had one; 4 x 512 tokens), SDPA then tiles: bf16
against float32 -0.24% / -0.59%, +0.11% / -0.10%; int8 against bf16 +0.17% / +0.32%,
+0.18% / +0.44%; int4 against bf16 +0.29% / +0.51%, -0.23% / +0.34%: all inside the 1%
bounds, each moved by at most 0.57 percentage points, either way.

Queries go in tiles of TILE_ROWS, each against the keys up to its own last position, so
the upper triangle is skipped but for each tile's diagonal block, which an additive mask
hides. The tiles attend as tile_attention.py does it (shared with runs over cached keys).

The speed-up is a one-thread figure. At two threads the flash kernel nearly halves its
time and the tiles do not keep up: one layer of the embedded model, interleaved in one
process on a quiet machine (2026-11-30, GOMP_SPINCOUNT=20000), flash against tiles 4.44
against 4.56 ms at 512 tokens and 18.2 against 19.8 ms at 1300 (one thread: 8.5 against
5.1, 35.7 against 32.7). Fresh runs keep the tiles at every thread count (runs over
cached keys switch to SDPA above one thread, paged_attention.py): at two threads they are
3-8% slower in attention, about 3% of a 1300-token prefill, within a run's noise, and
switching would change the numerics every fresh prefill and its tests were validated on
(the perplexity bounds above, the greedy comparisons); not measured end to end yet.
"""

from __future__ import annotations

import functools

import torch

from covey.llm_backend.tile_attention import TileAttention, use_tile_attention

# Query rows per tile: 64 measured fastest from 192 to 2048 tokens (1 thread, bf16; 128
# rows: 122 ms at 2048 against 102), short enough that a tile's float32 scores stay small.
TILE_ROWS = 64
# Shorter runs keep SDPA: below this, a handful of calls per layer cost more than they save
# (32 tokens: 0.07 ms SDPA against 0.10).
MIN_ROWS = 64


def use_causal_prefill(q: torch.Tensor) -> bool:
    """Whether a fresh run with queries q [n, H, Dh] goes through `causal_prefill`: on CPU,
    in bf16, the dtype it was measured in (float32 models keep SDPA, whose float32 kernel
    is as fast and which the greedy tests against transformers were measured on), and
    long enough."""
    return use_tile_attention(q) and q.shape[0] >= MIN_ROWS


def causal_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, H, Dh], k and v [n, KVH, Dh] of one run at positions 0..n-1 -> [n, H, Dh]:
    each query attends to the keys at its position and before."""
    n = q.shape[0]
    values = v.transpose(0, 1).contiguous()  # [KVH, n, Dh]
    tiles = TileAttention(q, k.transpose(0, 1), values, TILE_ROWS)
    diagonal = _diagonal_mask(TILE_ROWS, q.device)
    for start in range(0, n, TILE_ROWS):
        end = min(n, start + TILE_ROWS)
        # only the tile's own block of keys has any to hide
        tiles.attend(start, end, end, diagonal[: end - start, : end - start], start)
    return tiles.output()


@functools.cache
def _diagonal_mask(rows: int, device: torch.device) -> torch.Tensor:
    """The additive causal mask of a tile's diagonal block [rows, rows] (0 on and below the
    diagonal, -inf above), float32; built once, outside inference mode so that both modes
    may read it."""
    with torch.inference_mode(False):
        above = torch.ones(rows, rows, dtype=torch.bool, device=device).triu(1)
        return torch.zeros(rows, rows, device=device).masked_fill(above, float("-inf"))
