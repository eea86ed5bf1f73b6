"""One run's attention, query tile by query tile, by batched matmuls with float32 scores.

On CPU in bf16, SDPA's flash kernel runs at a fraction of oneDNN's batched matmul speed
(causal_prefill.py has the figures). Both kinds of prefill run attend this way there: a fresh
run over its own keys (causal_prefill.py) and a run over cached keys at its true positions
(paged_attention.py, tiles planned by query_tiles.py). Each KV head's G query heads are one
[G * rows, Dh] operand, so GQA repeats no keys; the keys are transposed and packed into
float32 [KVH, Dh, L] once per call, so every tile slices them in place. Scores are float32
(bf16 scores cost the int8 mode its perplexity bound, see causal_prefill.py); the
probabilities are rounded to bf16 for the product with the values, as the flash kernel does.

Over cached keys, a layer of the embedded model (9 query heads over 3 KV heads, head size
64) against one masked flash call per tile, interleaved in one process, one thread, CPU
time, on a loaded machine: a blend run (250 rows at scattered positions over 1300 keys)
6.2-6.3 ms against 7.2-7.3, 512 rows after 512 keys 12.3-13.1 against 15.1-15.7, 30 rows
after 1200 keys 1.5-1.7 against 1.5-1.7. The float32 score product is most of it: at this
head size oneDNN's float32 batched matmul runs at 70-90 GFLOP/s here, its bf16 one at
130-200, and torch has no bf16-in, float32-out matmul on CPU. At two threads the tiles
gained nothing (0.92-1.05x for the first two on a quiet machine, the short run 0.7-1.0x;
0.7-0.9x at load 3-4 with the engine's short OpenMP spin, 0.3x with OpenMP's default): the
flash kernel splits its work over heads and query blocks in one parallel region, the tiles
open four a tile, each batched over 3 KV heads. So runs over cached keys take the tiles at
one thread only (paged_attention.py). Against
float32 attention on random inputs the error is 1.05-1.28x the flash kernel's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_tile_attention(q: torch.Tensor) -> bool:
    """Whether queries q [n, H, Dh] attend by tiles: on CPU in bf16, where they were measured
    (float32 models keep SDPA, whose float32 kernel is as fast)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


class TileAttention:
    """One run's queries [n, H, Dh] over keys and values [KVH, L, Dh]; `attend` fills the
    output rows of one tile, `output` returns them all [n, H, Dh] once every row is done."""

    def __init__(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, max_rows: int
    ) -> None:
        n, h, dh = q.shape
        kvh, length, _ = keys.shape
        g = h // kvh
        # rows t * G + j of a KV head's operand are query t, head j of that KV head's group
        self.grouped = q.view(n, kvh, g, dh).transpose(0, 1)  # [KVH, n, G, Dh], a view
        # one tile's queries in float32, reused (upcast per tile: no float32 copy of all n)
        self.scratch = torch.empty(kvh, max_rows, g, dh, dtype=torch.float32, device=q.device)
        self.keys_t = torch.empty(kvh, dh, length, dtype=torch.float32, device=q.device)
        self.keys_t.copy_(keys.transpose(1, 2))  # [KVH, Dh, L]: packed
        self.values = values  # [KVH, L, Dh]: oneDNN takes the untransposed operand at any stride
        self.out = torch.empty(kvh, n * g, dh, dtype=q.dtype, device=q.device)

    def attend(self, start: int, end: int, keys: int, mask: torch.Tensor, mask_from: int) -> None:
        """Query rows [start, end) over keys [0, keys), the additive float32 `mask`
        [end - start, keys - mask_from] added to the scores of keys [mask_from, keys) (the
        keys before it are seen by every row of the tile)."""
        kvh, _, g, dh = self.grouped.shape
        rows = end - start
        queries = self.scratch[:, :rows]
        queries.copy_(self.grouped[:, start:end]).mul_(dh**-0.5)
        scores = torch.bmm(queries.view(kvh, rows * g, dh), self.keys_t[:, :, :keys])  # float32
        scores.view(kvh, rows, g, keys)[..., mask_from:].add_(mask[:, None])
        probs = F.softmax(scores, dim=-1).to(self.out.dtype)  # [KVH, rows * G, keys]
        torch.bmm(probs, self.values[:, :keys], out=self.out[:, start * g : end * g])

    def output(self) -> torch.Tensor:
        kvh, n, g, dh = self.grouped.shape
        return self.out.view(kvh, n, g, dh).transpose(0, 1).reshape(n, kvh * g, dh)
