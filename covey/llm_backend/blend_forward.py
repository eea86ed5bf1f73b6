"""CacheBlend's selective recompute over one sequence's region whose reused KV is in place.

A prompt made of chunks computed elsewhere lacks the attention between them. Recomputing
a few tokens restores most of it: the tokens whose KV deviates most from a full prefill.
The check layers (the first few) are computed for every token of the region, and there the
deviation of each reused token's fresh K and V from its cached (re-rotated) K and V is
measured, before the fresh KV overwrites it. On the later layers only the
ceil(ratio * reused) most deviating reused tokens are computed, with the region's own
tokens (those not reused); their fresh KV is scattered over the reused KV, and the rest
keeps the reused KV.

Every query attends by its true position: a token at position p sees the sequence's keys
at positions <= p, through the whole block table, whatever was recomputed. (A
bottom-right-aligned causal mask over the recomputed subset would let a recomputed token
see keys after it.) So ratio 1.0 recomputes everything and equals a full prefill, and
ratio 0 skips the check layers entirely: only the region's own tokens are computed on every
layer, over the reused KV as it is (plain concatenation).

`forced` rows (the heads of the reused chunks, `blend_sink_tokens`) are recomputed on every
layer whatever their deviation, beyond the ratio, which then applies to the other reused
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.chunk_planner import num_selected
from covey.llm_backend.model import LlamaModel


@dataclass
class BlendRegion:
    """One sequence's tokens [start, end) to blend; the pool already holds the reused KV."""

    input_ids: torch.Tensor  # [n] the region's token ids
    positions: torch.Tensor  # [n] start..end-1
    slots: torch.Tensor  # [n] each token's pool slot
    key_blocks: torch.Tensor  # [nb] the sequence's block table, covering positions 0..end-1
    reused: torch.Tensor  # [n] bool, True where the pool holds reused KV (never the last token)
    forced: torch.Tensor | None = None  # [n] bool, reused rows recomputed whatever they deviate


@dataclass
class BlendResult:
    hidden: torch.Tensor  # [1, hidden] the last token's final hidden state (for its logits)
    num_recomputed: int  # reused tokens recomputed on every layer


@torch.inference_mode()
def blend_forward(
    model: LlamaModel,
    kv_cache: torch.Tensor,
    region: BlendRegion,
    ratio: float,
    check_layers: tuple[int, ...],
    block_size: int,
) -> BlendResult:
    """Run the model over `region`, recomputing a `ratio` of its reused tokens (see above)."""
    if bool(region.reused[-1]):
        raise ValueError("the last token of a blend region must be computed (its logits)")
    device = region.positions.device
    length = int(region.positions[-1]) + 1
    keys = torch.arange(length, device=device)
    forced = region.forced if region.forced is not None else torch.zeros_like(region.reused)
    forced = forced & region.reused
    free = region.reused & ~forced
    reused_rows = free.nonzero().squeeze(1)  # [R] reused rows chosen by deviation
    own_rows = (~free).nonzero().squeeze(1)  # computed on every layer: own and forced
    num_reused = reused_rows.shape[0]
    num_forced = int(forced.sum())
    k = num_selected(ratio, num_reused)
    check = sorted(set(check_layers)) if k and k < num_reused else []
    select_after = check[-1] if check else -1  # the layer after which rows are chosen

    def metadata(rows: torch.Tensor | None) -> AttentionMetadata:
        pos = region.positions if rows is None else region.positions[rows]
        mask = keys[None, :] <= pos[:, None]  # [m, L]: true positions, never bottom-right
        return AttentionMetadata(
            slot_mapping=region.slots if rows is None else region.slots[rows],
            num_decode=0,
            block_size=block_size,
            prefills=[PrefillRun(0, mask.shape[0], region.key_blocks, mask)],
        )

    x = model.embed_tokens(region.input_ids)  # [n, hidden]
    cos, sin = model.rotary(region.positions, x.dtype)
    meta = metadata(None)
    reused_slots = region.slots[reused_rows]
    deviation = torch.zeros(num_reused, dtype=torch.float32, device=device)
    for i, layer in enumerate(model.layers):
        if i == select_after + 1:
            if k < num_reused:
                chosen = reused_rows[deviation.topk(k).indices] if check else reused_rows[:0]
                rows = torch.cat((own_rows, chosen)).sort().values
                x, cos, sin, meta = x[rows], cos[rows], sin[rows], metadata(rows)
        layer_kv = kv_cache[i]  # [2, KVH, S, Dh]
        if i in check:
            cached = layer_kv.index_select(2, reused_slots).float()  # before the overwrite
        x = layer(x, cos, sin, layer_kv, meta)
        if i in check:
            fresh = layer_kv.index_select(2, reused_slots).float()
            deviation += (fresh - cached).square().sum(dim=(0, 1, 3))  # [R]: K and V
    return BlendResult(model.norm(x[-1:]), num_forced + k)
