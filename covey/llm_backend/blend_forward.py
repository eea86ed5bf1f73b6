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

Which check layer matters more than the ratio (issue 9's probe, SmolLM2-135M, planted-fact
prompts whose chunks' KV came from earlier requests' prefills): the machinery is exact (layer
0's imported KV equals a full prefill's; the deviation falls with the ratio to none at 1.0),
but the deviation is dense, not sparse: the 15% most deviating tokens hold only ~half of it
on the deep layers, and the answer is written by decode steps that read every token's KV,
not by the last prompt token's logits. Layer 1's deviation ranks the deep deviation poorly
(Spearman 0.3-0.6, its top 15% holding 25-34% of it); layer 12's ranks it well (0.83-0.88,
46-53%, against 51-57% for the true top 15%). At ratio 0.15, 160 questions
(benchmarks/results/rag_kv_accuracy_check_layers.json): check layer 1 0.544, 4 0.537,
8 0.594, 12 0.600; full prefill 0.600.

Stored scores (EngineConfig.blend_stored_scores): a region whose reused rows all carry a
score stored with their chunk (`BlendRegion.stored_scores`, measured on the check layers
when the chunk was blended before) skips the check layers and picks its rows by those
scores before layer 0, so only the own and chosen rows are ever computed. A region with no
stored score runs the check layers over every row, and their scores come back per row
(`BlendResult.scores`, each chunk's normalised to mean 1: the raw deviation's scale depends
on the context, the ranking within a chunk less so) for the caller to store.

Partial check: a region where some reused rows have stored scores and others NaN (a chunk
never blended, or one whose refresh is due) splits the ratio's k between the two groups by
their sizes (largest remainder, k in all). The scored group's share is picked by stored
score before layer 0 (per chunk with the per_chunk quota); the check layers compute only the
own, forced, pre-chosen and unscored rows, and measure the deviation of the unscored ones;
after the last check layer the unscored group's share is kept by it, and the later layers
run as usual. Why: with stored scores on, most reused chunks of a popular corpus are scored,
and a full check for one unscored chunk computes every reused token (~1090 on five
planted-fact chunks) up to the check layer; the partial check computes the own rows, the
unscored chunk and the chosen ones. Each query still attends by its true position over the
whole block table, so the scored rows not computed are read from their reused KV on the
check layers, as the later layers read every unchosen row; the unscored chunk's deviation is
measured against that context rather than a fully recomputed one. Scores come back for the
unscored rows only (NaN elsewhere: the scored chunks were not measured, and keep their
stored scores).

The figures that follow come from a helper's script, not committed (so they cannot be
rerun from the repo), on a loaded machine (load 3-4, 2 CPU threads): indicative only.
8 prompts of five planted-fact chunks (~1090 reused tokens, one chunk of ~230 unscored;
default engine, bf16), the three paths interleaved on the same region in one process,
blend forward alone: partial check 0.71 s, full check 1.13 s, stored scores 0.61 s
(medians). A full check's chosen rows are only partly those of either: the partial check
shares 34-56% of them, the stored scores (measured in other contexts) 33-55%. Against a
full recompute (ratio 1.0) on 7 such prompts, the share of the reused KV's deviation left
on the layers after the check layer is 0.19 by stored scores, 0.19 by a partial check, 0.13
by a full check, and the last token's KL 0.026, 0.012 and 0.007 (medians): a partial check
kept about a stored-score blend's quality (a little better on the logits) at ~1.2x its
time, where a full check, a little closer to full prefill, took ~1.9x.

`forced` rows (the heads of the reused chunks, `blend_sink_tokens`) are recomputed on every
layer whatever their deviation, beyond the ratio, which then applies to the other reused
tokens. `BlendPolicy` says how the others are ranked (deviation of K, V or both, or the
attention the question pays them) and whether the top is taken globally or per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covey.errors import ConfigError
from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.chunk_planner import num_selected
from covey.llm_backend.config import BLEND_QUOTAS, BLEND_SCORES
from covey.llm_backend.layers import apply_rotary
from covey.llm_backend.model import LlamaModel

# Where the check layer sits by default, as a fraction of the depth: layer 8 of SmolLM2's
# 30, the shallowest measured layer whose choice of tokens held full prefill's accuracy.
DEFAULT_CHECK_DEPTH = 8 / 30


def default_check_layers(num_layers: int) -> tuple[int, ...]:
    """The check layer when EngineConfig.blend_check_layers is None: at DEFAULT_CHECK_DEPTH
    of the model. Deeper layers rank the tokens that matter better (the module docstring's
    probe: layer 1 lost 5.6 points of accuracy at ratio 0.15, layer 8 0.6, layer 12 none),
    but every reused token not chosen by stored scores is computed in full up to the check
    layer, so a deeper one costs more of the prefill it saves; 8 of 30 is the cheapest that
    held the accuracy."""
    return (min(num_layers - 1, round(num_layers * DEFAULT_CHECK_DEPTH)),)


@dataclass(frozen=True)
class BlendPolicy:
    """How the recomputed reused tokens are chosen on the check layers.

    `score`: "kv" ranks by how far a token's fresh K and V are from its reused ones (the
    CacheBlend deviation), "k" or "v" by one of them; "attention" by the attention the
    region's last own tokens (the question after the chunks, always computed) pay to it:
    what the request will read, wherever the deviation is (query-aware, as EPIC and A^3
    argue); "kv+attention" adds the two, each normalised to sum 1. With several check
    layers each layer's scores are normalised to sum 1 before adding, so no layer's scale
    dominates. `quota`: "global" takes the top ceil(ratio * reused) over all reused tokens;
    "per_chunk" gives each reused chunk its share (largest remainders, same total), so a
    chunk whose deviation is low everywhere still gets some of its tokens recomputed.
    """

    score: str = "kv"
    quota: str = "global"

    def __post_init__(self) -> None:
        # EngineConfig checks its knobs; a policy built directly is checked here, so a
        # misspelt name is an error rather than the default ranking run silently.
        for name, value, allowed in (
            ("score", self.score, BLEND_SCORES),
            ("quota", self.quota, BLEND_QUOTAS),
        ):
            if value not in allowed:
                raise ConfigError(f"BlendPolicy.{name} must be one of {allowed}, got {value!r}")


@dataclass
class BlendRegion:
    """One sequence's tokens [start, end) to blend; the pool already holds the reused KV."""

    input_ids: torch.Tensor  # [n] the region's token ids
    positions: torch.Tensor  # [n] start..end-1
    slots: torch.Tensor  # [n] each token's pool slot
    key_blocks: torch.Tensor  # [nb] the sequence's block table, covering positions 0..end-1
    reused: torch.Tensor  # [n] bool, True where the pool holds reused KV (never the last token)
    forced: torch.Tensor | None = None  # [n] bool, reused rows recomputed whatever they deviate
    groups: torch.Tensor | None = None  # [n] long: the reused chunk of each row (per_chunk)
    # [n] float: each reused row's score stored with its chunk, NaN where it has none (all
    # NaN: a full check; some: a partial check); None when stored scores are not used (then
    # the check layers always run over every row and no scores come back)
    stored_scores: torch.Tensor | None = None


@dataclass
class BlendResult:
    hidden: torch.Tensor  # [1, hidden] the last token's final hidden state (for its logits)
    num_recomputed: int  # reused tokens recomputed on every layer
    # [n] float32 on CPU: the check layers' score of each reused row they measured (chosen
    # by score and, in a partial check, unscored), normalised to mean 1 per chunk, NaN on
    # the other rows; None when no check layer ran
    # or the region had no stored_scores (stored scores off: nothing to store)
    scores: torch.Tensor | None = None
    checked: bool = False  # whether the check layers ran (over all rows or, partial, some)


def stored_ready(region: BlendRegion) -> bool:
    """Whether every reused row chosen by score (not forced) has a stored score."""
    if region.stored_scores is None:
        return False
    forced = region.forced if region.forced is not None else torch.zeros_like(region.reused)
    free = region.reused & ~forced
    return not bool(torch.isnan(region.stored_scores[free]).any())


def per_chunk_normalised(score: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`score` divided by its chunk's mean (rows grouped by `groups`), so a chunk's stored
    scores do not carry the scale of the context they were measured in. A chunk with a
    non-finite row or no deviation at all (mean 0) gets NaN (unknown) on every row: such a
    measurement says nothing to rank its tokens by, and must not be merged as if it did."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    finite = torch.isfinite(score)
    sums = torch.zeros(len(ids), dtype=score.dtype, device=score.device)
    sums.index_add_(0, inverse, torch.where(finite, score, torch.zeros_like(score)))
    counts = torch.bincount(inverse, minlength=len(ids)).to(score.dtype)
    bad = torch.zeros(len(ids), dtype=torch.bool, device=score.device)
    bad.index_put_((inverse,), ~finite, accumulate=True)
    means = sums / counts
    means = torch.where(bad | ~(means > 0), torch.full_like(means, float("nan")), means)
    return score / means[inverse]


def chunk_groups(reused: torch.Tensor) -> torch.Tensor:
    """Each row's chunk when no groups are given: a run of contiguous reused rows."""
    starts = reused & ~torch.cat((reused.new_zeros(1), reused[:-1]))
    return torch.cumsum(starts.long(), 0) - 1


def shares(counts: torch.Tensor, k: int) -> torch.Tensor:
    """[g] long: `k` split over groups of `counts` rows in proportion to their sizes (floor,
    then the largest remainders), so the shares add up to exactly k."""
    exact = counts.double() * k / int(counts.sum())
    share = exact.floor().long()
    rest = k - int(share.sum())
    if rest:
        share[(exact - share).topk(rest).indices] += 1
    return share


def top_rows(
    scores: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor, k: int, quota: str
) -> torch.Tensor:
    """The `k` of `rows` (region rows, `scores` one per row) with the highest scores: over
    all of them, or each chunk (`groups`, per region row) its share with "per_chunk"."""
    if quota == "per_chunk":
        return rows[quota_topk(scores, groups[rows], k)]
    return rows[scores.topk(k).indices]


def subset_index(current: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Where region `rows` sit among the rows now computed (`current`, sorted; None: all
    of the region's rows, in order)."""
    return rows if current is None else torch.searchsorted(current, rows)


def quota_topk(scores: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of `k` rows: each group's top rows, the group getting its share of k by its
    size (floor, then the largest remainders), so the total is exactly k."""
    ids, counts = torch.unique(groups, return_counts=True)
    share = shares(counts, k)
    picked = []
    for g, n in zip(ids.tolist(), share.tolist(), strict=True):
        if n:
            rows = (groups == g).nonzero().squeeze(1)
            picked.append(rows[scores[rows].topk(n).indices])
    return torch.cat(picked) if picked else scores.new_zeros(0, dtype=torch.long)


def _question_attention(
    layer, x_in, cos, sin, rows, positions, kv, key_slots, reused_pos
) -> torch.Tensor:
    """[R] the attention `rows` (the question) pay to each reused position on this layer
    (summed over their heads), by the fresh keys the layer just stored."""
    attn = layer.self_attn
    h = layer.input_layernorm(x_in[rows])
    q = attn.qkv_proj(h)[:, : attn.q_size].view(len(rows), attn.num_heads, attn.head_dim)
    q = apply_rotary(q, cos[rows], sin[rows]).float()  # [t, H, Dh]
    keys = kv[0].index_select(1, key_slots).float()  # [KVH, L, Dh]
    kvh = keys.shape[0]
    q = q.view(len(rows), kvh, attn.num_heads // kvh, attn.head_dim)
    logits = torch.einsum("tkgd,kld->tkgl", q, keys) / attn.head_dim**0.5
    visible = torch.arange(keys.shape[1], device=keys.device) <= positions[rows][:, None]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)  # [t, KVH, g, L]
    return probs[..., reused_pos].sum(dim=(0, 1, 2))


def _normalised(x: torch.Tensor) -> torch.Tensor:
    total = x.sum()
    return x / total if total > 0 else x


@torch.inference_mode()
def blend_forward(
    model: LlamaModel,
    kv_cache: torch.Tensor,
    region: BlendRegion,
    ratio: float,
    check_layers: tuple[int, ...],
    block_size: int,
    policy: BlendPolicy | None = None,
) -> BlendResult:
    """Run the model over `region`, recomputing a `ratio` of its reused tokens (see above)."""
    policy = policy or BlendPolicy()
    if bool(region.reused[-1]):
        raise ValueError("the last token of a blend region must be computed (its logits)")
    device = region.positions.device
    length = int(region.positions[-1]) + 1
    keys = torch.arange(length, device=device)
    forced = region.forced if region.forced is not None else torch.zeros_like(region.reused)
    forced = forced & region.reused
    free = region.reused & ~forced
    reused_rows = free.nonzero().squeeze(1)  # [R] reused rows chosen by score
    own_rows = (~free).nonzero().squeeze(1)  # computed on every layer: own and forced
    num_reused = reused_rows.shape[0]
    num_forced = int(forced.sum())
    k = num_selected(ratio, num_reused)
    groups = region.groups if region.groups is not None else chunk_groups(region.reused)
    choosing = bool(k and k < num_reused)
    stored = choosing and stored_ready(region)
    # Partial check: some free rows have stored scores, some NaN. The scored rows' share of
    # k is picked by stored score before layer 0; the check layers measure the others.
    partial = False
    if choosing and not stored and region.stored_scores is not None:
        known = ~torch.isnan(region.stored_scores[reused_rows])
        partial = bool(known.any())
    check = sorted(set(check_layers)) if choosing and not stored else []
    select_after = check[-1] if check else -1  # the layer after which rows are chosen
    current = None  # the region rows computed now, sorted; None: all of them
    # the reused rows chosen after the check layers (by their measure, or by stored scores
    # with no check layer): all of them, or a partial check's unscored ones
    measured_rows = reused_rows
    k_measured = k
    if partial:
        assert region.stored_scores is not None
        scored_rows, measured_rows = reused_rows[known], reused_rows[~known]
        split = shares(torch.tensor([len(scored_rows), len(measured_rows)]), k).tolist()
        k_scored, k_measured = split
        prechosen = reused_rows[:0]
        if k_scored:
            stored_score = region.stored_scores[scored_rows].float()
            prechosen = top_rows(stored_score, scored_rows, groups, k_scored, policy.quota)
        own_rows = torch.cat((own_rows, prechosen)).sort().values  # now on every layer
        current = torch.cat((own_rows, measured_rows)).sort().values
    deviation = "attention" != policy.score
    attention = "attention" in policy.score
    if attention and check:
        last_reused = int(region.reused.nonzero().max())
        question = (~region.reused).nonzero().squeeze(1)
        question = question[question > last_reused]  # the own tokens after every chunk
        blocks = region.key_blocks
        key_slots = blocks[keys // block_size] * block_size + keys % block_size  # [L]
        reused_pos = region.positions[measured_rows]
        question_pos = region.positions if current is None else region.positions[current]
        question = subset_index(current, question)

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
    if current is not None:
        x, cos, sin = x[current], cos[current], sin[current]
    meta = metadata(current)
    measured_slots = region.slots[measured_rows]
    num_measured = measured_rows.shape[0]
    dev_score = torch.zeros(num_measured, dtype=torch.float32, device=device)
    att_score = torch.zeros(num_measured, dtype=torch.float32, device=device)
    measured = None
    for i, layer in enumerate(model.layers):
        if i == select_after + 1 and k < num_reused:
            chosen = reused_rows[:0]
            score = None
            if stored:
                assert region.stored_scores is not None
                score = region.stored_scores[reused_rows].float()
            elif check:
                score = dev_score if deviation else att_score
                if deviation and attention:
                    score = _normalised(dev_score) + _normalised(att_score)
                if region.stored_scores is not None:  # for the caller to store
                    measured = per_chunk_normalised(score, groups[measured_rows])
            if score is not None and k_measured:
                chosen = top_rows(score, measured_rows, groups, k_measured, policy.quota)
            rows = torch.cat((own_rows, chosen)).sort().values
            at = subset_index(current, rows)
            x, cos, sin, meta = x[at], cos[at], sin[at], metadata(rows)
            current = rows
        layer_kv = kv_cache[i]  # [2, KVH, S, Dh]
        if i in check:
            cached = layer_kv.index_select(2, measured_slots).float()  # before the overwrite
            x_in = x
        x = layer(x, cos, sin, layer_kv, meta)
        if i in check:
            if deviation:
                fresh = layer_kv.index_select(2, measured_slots).float()
                diff = (fresh - cached).square().sum(dim=(1, 3))  # [2, R]: K and V
                part = {"kv": diff.sum(0), "k": diff[0], "v": diff[1]}.get(policy.score, None)
                dev_score += _normalised(diff.sum(0) if part is None else part)
            if attention:
                att_score += _normalised(
                    _question_attention(
                        layer,
                        x_in,
                        cos,
                        sin,
                        question,
                        question_pos,
                        layer_kv,
                        key_slots,
                        reused_pos,
                    )
                )
    scores = None
    if measured is not None:
        scores = torch.full((len(region.reused),), float("nan"), dtype=torch.float32)
        scores[measured_rows.cpu()] = measured.cpu()
    return BlendResult(model.norm(x[-1:]), num_forced + k, scores, bool(check))
