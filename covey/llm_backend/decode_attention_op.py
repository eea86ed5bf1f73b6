"""`covey::decode_attention`: the compiled decode step's paged attention, as one custom op.

Paged attention cannot be traced into the step graph: its gathers and block tables change
every step. So the graph calls it as an opaque op, once per layer. The op reads the KV pool
and the step's attention metadata from a per-thread step context (`step_context.attn`, set
by `CompiledDecode` around each step) instead of taking them as graph inputs: a pool written
in place would be functionalized by the compiler (copies of the whole pool), and the
metadata holds Python structures a graph cannot take. What the 30 calls of a step share is
worked out once per step (`StepAttention`).
"""

from __future__ import annotations

import threading

import torch

from covey.errors import EngineError
from covey.llm_backend.attention_metadata import AttentionMetadata
from covey.llm_backend.paged_attention import attend_slice, attend_spans, paged_attention

step_context = threading.local()  # .attn: the running step's StepAttention


class StepAttention:
    """What the step's 30 `covey::decode_attention` calls share, worked out once per step:
    the pool's per-layer key and value views, and for the common single-stream case (one
    sequence whose keys lie in pool order, or in a few stretches of it) where its keys
    are. Each call then runs ~12 ATen ops instead of `store_kv` and `paged_attention`'s ~25
    and their metadata lookups."""

    def __init__(self, kv: torch.Tensor, layer_views: tuple, meta: AttentionMetadata) -> None:
        self.kv, self.meta = kv, meta
        self.keys, self.values = layer_views  # per layer [KVH, S, Dh], views of the pool
        self.slots = meta.slot_mapping
        group = meta.decode_groups[0] if len(meta.decode_groups) == 1 else None
        # The one sequence's key slots: [a, b) when its blocks lie in pool order, else the
        # stretches of `DecodeGroup.spans`; None for any other step.
        self.span: tuple[int, int] | None = None
        self.spans: tuple[tuple[int, int], ...] | None = None
        if (
            group is not None
            and group.blocks is None
            and meta.num_decode == group.end == 1
            and not meta.prefills  # else the step's queries are more than the one row
        ):
            if group.spans is not None:
                self.spans = group.spans
            else:
                assert group.contiguous_start is not None
                self.span = (group.contiguous_start, group.contiguous_start + group.length)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int):
        """Store layer `layer`'s new keys/values k, v [KVH, T, Dh], then attend: q [T, H, Dh]
        -> [T, H, Dh]. The single-stream case calls `attend_slice` (or `attend_spans`), as
        `paged_attention._decode` does (so the same bits), without its general-case
        bookkeeping."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(1, self.slots, k)
        values.index_copy_(1, self.slots, v)
        if self.span is not None:
            return attend_slice(q, keys, values, *self.span)
        if self.spans is not None:
            return attend_spans(q, self.kv[layer], self.spans)
        return paged_attention(q, k.transpose(0, 1), v.transpose(0, 1), self.kv[layer], self.meta)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int):
    attn = getattr(step_context, "attn", None)
    if attn is None:
        raise EngineError("covey::decode_attention runs only inside CompiledDecode.forward")
    return attn.attend(q, k, v, layer)


# Registered with torch.library.Library rather than the `custom_op` decorator: that one
# wraps every call in a dynamo-disabling context and checks the result for aliasing (a
# call through the dispatcher: ~2 us against ~4, measured loaded; 30 calls a step). The
# graph never traces into the kernel (it sees the fake below).
_LIB = torch.library.Library("covey", "FRAGMENT")
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")
_LIB.impl("decode_attention", _decode_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("covey::decode_attention", lib=_LIB)
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


# Store layer `layer`'s new keys/values k, v [KVH, T, Dh] in the pool, then attend: q
# [T, H, Dh] -> [T, H, Dh]. The pool and metadata come from the step context.
decode_attention = torch.ops.covey.decode_attention
