"""What the chunk KV store keeps: one span's KV, with the keys that say when it is reusable.

A span's KV is reusable exactly when the same tokens follow the same context (RAGCache's
knowledge tree, flattened to a hash of the context), and approximately, for blending,
wherever the same tokens appear (CacheBlend). So an entry carries both keys: the chain hash
of everything before it when it was computed, and the hash of its own tokens.

Hashes are blake2b over little-endian int32 token ids, so they are stable across runs and
machines: the disk tier's files, named by them, stay valid after a restart.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

ROOT_HASH = ""  # the context hash of a span at position 0 after nothing
STANDALONE_PREFIX = "standalone:"  # context marker for KV computed alone at position 0

_DIGEST_BYTES = 16


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    try:
        packed = array("i", token_ids)
    except OverflowError as e:
        raise ValueError(f"token ids must fit in int32: {e}") from None
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def content_hash(token_ids: Sequence[int]) -> str:
    """The hash of a span's own tokens: the key for reuse at any position (blend)."""
    return hashlib.blake2b(_token_bytes(token_ids), digest_size=_DIGEST_BYTES).hexdigest()


def chain_hash(parent: str, token_ids: Sequence[int]) -> str:
    """The context hash after `token_ids` follow a context whose hash is `parent`.

    Chained span by span from ROOT_HASH, so it depends on how the context was split into
    spans: the same spans give the same hash, a different split a different one (a miss,
    never a wrong hit).
    """
    h = hashlib.blake2b(parent.encode(), digest_size=_DIGEST_BYTES)
    h.update(b"\x00")
    h.update(_token_bytes(token_ids))
    return h.hexdigest()


def entry_key(context_hash: str, content: str) -> str:
    """The store's key for a span's exact KV: its context and its content. Also the
    disk tier's file name, so it is hex only."""
    h = hashlib.blake2b(context_hash.encode(), digest_size=_DIGEST_BYTES)
    h.update(b"\x00")
    h.update(content.encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ChunkKV:
    """One span's KV as computed once, on CPU in the pool's dtype.

    `chunk_id` is the Segment's id (None for a span that is not a chunk, kept for exact
    reuse only); it is advisory: lookups go by the tokens' hash, and an id that arrives with
    other text marks the old entries stale. `start_position` is the position of token 0 when
    the KV was computed (blend re-rotates keys from there); `context_hash` is the chain hash
    of every token before it then, or a STANDALONE_PREFIX marker when computed alone.

    `scores` ([n] float16, NaN where unknown, or None): how far each token's KV deviated on
    blend's check layers when the entry was blended before, normalised to mean 1 over the
    chunk (EngineConfig.blend_stored_scores). Which tokens of a chunk need recomputing
    depends mostly on the chunk, so a later blend can pick them from here without running
    the check layers. Counted in `nbytes`: 2 bytes a token against the KV's thousands.
    """

    chunk_id: str | None
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, kv_heads, n, head_dim]
    start_position: int
    context_hash: str
    scores: torch.Tensor | None = None  # [n] float16

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        if not self.token_ids:
            raise ValueError("a ChunkKV needs at least one token")
        shape = tuple(self.kv.shape)
        if len(shape) != 5 or shape[1] != 2 or shape[3] != len(self.token_ids):
            raise ValueError(
                "ChunkKV.kv must be [layers, 2, kv_heads, n, head_dim] with n = "
                f"{len(self.token_ids)} tokens, got shape {list(shape)}"
            )
        if self.start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {self.start_position}")
        if self.scores is not None and (
            tuple(self.scores.shape) != (len(self.token_ids),)
            or self.scores.dtype != torch.float16
        ):
            raise ValueError(
                f"ChunkKV.scores must be float16 [{len(self.token_ids)}], got "
                f"{self.scores.dtype} {list(self.scores.shape)}"
            )

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scores is None else self.scores.numel() * self.scores.element_size()
        return self.kv.numel() * self.kv.element_size() + extra

    @property
    def fully_scored(self) -> bool:
        """Whether every token has a stored score."""
        return self.scores is not None and not bool(torch.isnan(self.scores).any())

    def merged_scores(
        self, offset: int, fresh: torch.Tensor, weight: float = 0.5
    ) -> torch.Tensor:
        """The scores after a blend measured `fresh` for tokens [offset, offset + len):
        old + weight * (new - old) where a score was known, the new one where none was.
        The store passes 1 / (measurements so far + 1), capped at SCORES_MEAN_OVER
        measurements: a running mean over the contexts measured, then a moving average, so
        a popular chunk's ranking settles instead of following its latest context; 0.5
        weighs the newest as much as all the earlier ones together."""
        n = len(self.token_ids)
        if self.scores is None:
            scores = torch.full((n,), float("nan"), dtype=torch.float32)
        else:
            scores = self.scores.float().clone()
        fresh = fresh.detach().to("cpu", torch.float32)
        old = scores[offset : offset + len(fresh)]
        measured = ~torch.isnan(fresh)
        merged = torch.where(torch.isnan(old), fresh, old + weight * (fresh - old))
        scores[offset : offset + len(fresh)] = torch.where(measured, merged, old)
        return scores.to(torch.float16)

    @cached_property
    def content(self) -> str:
        return content_hash(self.token_ids)

    @cached_property
    def key(self) -> str:
        return entry_key(self.context_hash, self.content)
