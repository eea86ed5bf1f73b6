"""Plans how a prompt with chunk segments gets its KV: exact reuse, blending, or compute.

RAGCache's policy, on top of the pool's prefix cache (which a sequence has already matched
when it is planned):
1. Exact: walking the spans from the cursor, a span (a chunk, or a static span after the
   first chunk; dynamic spans are per request, never stored) that the store holds after
   exactly the same tokens is imported as it is: lossless, and token-granular, so spans
   need not line up with blocks. A span cut by the prefix-cache cursor is imported from
   the cursor on.
2. Blend (chunk_cache="blend"): at the first span that misses, if any chunk from there on
   is in the store after some other context, the rest of the prompt becomes ONE blend run
   (`blend_forward`): those chunks' KV is imported, re-rotated to the new positions, and a
   fraction of their tokens recomputed. A blend run is never split by chunked prefill.
3. Everything else is computed, in budget-sized pieces like any prefill.
With `stored_scores` (EngineConfig.blend_stored_scores) each reused chunk of a blend is
scored when every row it chooses by score has a score from earlier blends and no refresh is
due (`ChunkStore.scores_fresh`). A blend whose chunks are all scored is charged no check
layers (it runs none; see blend_forward); one with none scored is charged them over every
reused token; one with some scored runs a partial check, charged the check layers over the
unscored chunks' tokens only (a popular corpus is mostly scored: a full check for one new
chunk would compute every reused token, ~1090 on five planted-fact chunks, up to the check
layer). A blend that runs check layers stores what they measured with each chunk they
measured (`record_scores`); the scored chunks of a partial check count a stored use toward
their refresh.
Spans computed here are stored afterwards for the next request (by `ChunkStorer`): with
their exact context key while their KV is exact, and under a "blended:" context (reusable by
blending only) once they follow blended KV. The last prompt token is always computed: its
logits are sampled.

A plan is made when a sequence is admitted and consumed step by step (`take`, then
`commit` once the scheduler keeps the step). It is bound to the cursor it reached: a
sequence whose cursor moved otherwise (preempted, its KV discarded) is planned afresh.
Plain Python over the store's entries: the copies happen in the model runner.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from covey.cache.chunk_store import ROOT_HASH, ChunkKV, ChunkStore, chain_hash
from covey.llm_backend.sequence import Sequence

log = logging.getLogger(__name__)

BLENDED_CONTEXT = "blended:"  # context marker of KV computed after blended KV: blend-only


def num_selected(ratio: float, num_reused: int) -> int:
    """How many reused tokens a blend recomputes on every layer: ceil(ratio * reused)."""
    return min(num_reused, math.ceil(ratio * num_reused - 1e-9))


def sink_rows(imports: tuple[KVImport, ...] | list[KVImport], sink_tokens: int) -> list[int]:
    """Positions a blend recomputes whatever their deviation: the first `sink_tokens` of
    every reused chunk whose head is in the blend (an import from the entry's token 0).

    A chunk's KV was computed after other tokens than here (or alone, where its first token
    was the attention sink): its head's KV carries attention mass meant for that context,
    which the check layers' deviation does not always rank first (EPIC's observation)."""
    rows: list[int] = []
    for imp in imports:
        if imp.offset == 0:
            rows.extend(range(imp.start, min(imp.end, imp.start + sink_tokens)))
    return rows


def imports_scored(imports: tuple[KVImport, ...] | list[KVImport], sink_tokens: int) -> bool:
    """Whether every reused token of `imports` that is chosen by score (not a sink row) has
    a score stored with its entry: the blend then runs no check layer."""
    for imp in imports:
        scores = imp.entry.scores
        if scores is None:
            return False
        a = imp.offset + (sink_tokens if imp.offset == 0 else 0)
        b = imp.offset + imp.end - imp.start
        if a < b and bool(torch.isnan(scores[a:b]).any()):
            return False
    return True


def stored_region_scores(
    imports: tuple[KVImport, ...] | list[KVImport], start: int, end: int
) -> torch.Tensor:
    """[end - start] float32: each reused position's stored score, NaN where none."""
    out = torch.full((end - start,), float("nan"), dtype=torch.float32)
    for imp in imports:
        if imp.entry.scores is not None:
            n = imp.end - imp.start
            out[imp.start - start : imp.end - start] = imp.entry.scores[
                imp.offset : imp.offset + n
            ].float()
    return out


def record_scores(
    store: ChunkStore,
    imports: tuple[KVImport, ...] | list[KVImport],
    start: int,
    scores: torch.Tensor,
) -> None:
    """Store a blend's measured scores (`scores`: [region] over positions from `start`)
    with each reused entry, for its tokens this blend imported. An import that is only
    part of its chunk (it starts inside it, after a prefix-cache hit, or ends before the
    chunk's last token) records nothing: its scores are normalised over the part, a scale
    that does not mix with whole-chunk scores. An import whose scores are all NaN is left
    alone, its stored scores and refresh count (`ChunkStore.note_stored_use`) as they were:
    either it was not measured (its stored scores chose its rows in a partial check, or all
    its rows are sinks), so its count runs on; or it was measured but `per_chunk_normalised`
    made every row NaN (a non-finite deviation, or none at all), so it stays due (or
    unscored) and the next blend of it measures it again."""
    for imp in imports:
        if imp.offset > 0 or imp.end - imp.start < len(imp.entry.token_ids):
            continue
        part = scores[imp.start - start : imp.end - start]
        if bool(torch.isnan(part).all()):
            continue  # nothing usable measured: scores and refresh count unchanged
        store.update_scores(imp.entry, imp.offset, part)


def num_blend_recomputed(ratio: float, num_reused: int, num_sinks: int) -> int:
    """Reused tokens recomputed on every layer: the sinks, then ceil(ratio * the rest)."""
    return num_sinks + num_selected(ratio, num_reused - num_sinks)


@dataclass(frozen=True)
class KVImport:
    """Copy `entry`'s KV for tokens [start, end) of the sequence into its slots."""

    start: int
    end: int
    entry: ChunkKV
    offset: int  # the entry's token index of `start`
    delta: int  # positions to re-rotate the keys by (0 for an exact import)


@dataclass(frozen=True)
class Piece:
    start: int
    end: int
    kind: Literal["compute", "import", "blend"]
    imports: tuple[KVImport, ...] = ()  # import: one; blend: the reused chunks inside


@dataclass(frozen=True)
class SpanToStore:
    """A span this sequence computes, to store once its KV is in the pool."""

    start: int
    end: int
    chunk_id: str | None
    context_hash: str


@dataclass
class ChunkPlan:
    pieces: list[Piece]
    to_store: list[SpanToStore]
    position: int  # the cursor the next piece starts from
    index: int = 0  # the next piece
    reused_tokens: int = 0  # committed so far: imported exactly or blended
    recomputed_tokens: int = 0  # of the blended, recomputed on every layer

    @property
    def done(self) -> bool:
        return self.index >= len(self.pieces)


@dataclass
class ChunkStep:
    """One step's share of a plan: imports first, then normal compute ranges or a blend."""

    advance: int  # tokens the cursor moves (imported and computed)
    cost: int  # tokens it charges to the step's budget (what it computes)
    imports: list[KVImport]
    compute: list[tuple[int, int]]
    blend: Piece | None
    num_recomputed: int  # blend only: reused tokens recomputed on every layer
    next_index: int
    next_position: int
    blend_start: int | None = None  # the first position whose KV is not exact
    checked: bool = False  # blend only: it runs the check layers (over all or some chunks)
    by_stored: bool = False  # blend only: it chooses by stored scores, with no check layer
    # one per import of a blend: whether its stored scores choose its rows (the check layers
    # skip it); (False,) * n for a blend that chooses no rows by score (ratio 0 or 1, sinks
    # only, stored scores off), () only for a step with no blend
    scored: tuple[bool, ...] = ()
    partly_checked: bool = False  # blend only: the check layers run over unscored imports only
    scores_recorded: bool = False  # blend only: its scores were stored (a retry adds none)


@dataclass
class ChunkCounters:
    """The engine's own chunk counters (the store counts its tiers' hits itself)."""

    pool_hits: int = 0  # chunk spans the prefix cache served whole
    pool_misses: int = 0
    pool_reused_tokens: int = 0  # chunk tokens served by the prefix cache
    reused_tokens: int = 0  # imported from the store, exactly or blended
    recomputed_tokens: int = 0  # blended tokens recomputed on every layer
    stored_spans: int = 0
    store_refused: int = 0
    checked_blends: int = 0  # blend runs that ran the check layers (fully or partly)
    partly_checked_blends: int = 0  # of those, partial checks: some chunks chose by scores
    stored_score_blends: int = 0  # blend runs that chose by stored scores instead


class ChunkPlanner:
    def __init__(
        self,
        store: ChunkStore,
        mode: str,
        ratio: float,
        check_layers: tuple[int, ...],
        num_layers: int,
        sink_tokens: int = 0,
        stored_scores: bool = False,
    ) -> None:
        self.store = store
        self.blend = mode == "blend"
        self.ratio = ratio
        self.sink_tokens = sink_tokens
        self.stored_scores = stored_scores
        self.check_fraction = (max(check_layers) + 1) / num_layers if ratio > 0 else 0.0
        self.counters = ChunkCounters()

    def plan(self, seq: Sequence) -> ChunkPlan:
        """The plan for `seq` from its cursor: kept if it was made for this cursor, else
        made now (store lookups happen here, once per plan)."""
        plan = seq.chunk_plan
        if plan is not None and plan.position == seq.num_computed_tokens:
            return plan
        try:
            plan = self._make(seq)
        except Exception:  # a store that fails (an unreadable disk) must not fail requests
            log.warning("chunk planning failed for %s", seq.request_id, exc_info=True)
            cursor = seq.num_computed_tokens
            plan = ChunkPlan([Piece(cursor, len(seq), "compute")], [], cursor)
        seq.chunk_plan = plan
        return plan

    def _make(self, seq: Sequence) -> ChunkPlan:
        ids, end, cursor = seq.token_ids, len(seq), seq.num_computed_tokens
        seq.metrics.num_reused_tokens = seq.metrics.num_recomputed_tokens = 0
        self._count_pool(seq)
        first_chunk = min(s.start for s in seq.segments if s.kind == "chunk")
        pieces: list[Piece] = []
        to_store: list[SpanToStore] = []
        pos = cursor
        blend_ok = self.blend and not seq.prefill_only
        spans = [s for s in seq.segments if s.end > cursor and s.start < end]
        for k, span in enumerate(spans):
            start, stop = max(span.start, cursor), min(span.end, end)
            if pos < start:
                pieces.append(Piece(pos, start, "compute"))
            eligible = span.start >= first_chunk and span.end <= end and span.kind != "dynamic"
            context = chain_hash(ROOT_HASH, ids[: span.start]) if eligible else ""
            tokens = ids[span.start : span.end]
            if eligible and blend_ok and not self.store.contains_exact(context, tokens):
                later = [s for s in spans[k:] if s.kind == "chunk" and s.end <= end]
                if any(self.store.contains_any(ids[s.start : s.end]) for s in later):
                    blend = self._blend_piece(seq, start, spans[k:], to_store)
                    if blend is not None:
                        pieces.append(blend)
                        return ChunkPlan(_merged(pieces), to_store, cursor)
            hit = self.store.get_exact(context, tokens) if eligible else None
            if hit is not None and start < min(stop, end - 1):
                last = min(stop, end - 1)
                pieces.append(
                    Piece(
                        start,
                        last,
                        "import",
                        (KVImport(start, last, hit, start - span.start, 0),),
                    )
                )
                if last < stop:
                    pieces.append(Piece(last, stop, "compute"))
            else:
                pieces.append(Piece(start, stop, "compute"))
                if eligible:
                    to_store.append(SpanToStore(span.start, span.end, span.chunk_id, context))
            pos = stop
        if pos < end:
            pieces.append(Piece(pos, end, "compute"))
        return ChunkPlan(_merged(pieces), to_store, cursor)

    def _blend_piece(
        self, seq: Sequence, start: int, spans: list, to_store: list[SpanToStore]
    ) -> Piece | None:
        """One blend run over [start, len(seq)): chunks the store holds are reused, the rest
        computed. Spans computed before the first reused chunk are exact and stored so;
        chunks computed after it are stored blend-only. None when no chunk was found after
        all (an entry could not be loaded)."""
        ids, end = seq.token_ids, len(seq)
        first_chunk = min(s.start for s in seq.segments if s.kind == "chunk")
        imports: list[KVImport] = []
        fresh: list[SpanToStore] = []
        for span in spans:
            if span.end > end:
                continue
            entry = None
            if span.kind == "chunk":
                entry = self.store.get_any(span.chunk_id, ids[span.start : span.end])
            a, b = max(span.start, start), min(span.end, end - 1)
            if entry is not None:
                if a < b:
                    delta = span.start - entry.start_position
                    imports.append(KVImport(a, b, entry, a - span.start, delta))
                continue
            context = chain_hash(ROOT_HASH, ids[: span.start])
            if not imports and span.start >= first_chunk and span.kind != "dynamic":
                fresh.append(SpanToStore(span.start, span.end, span.chunk_id, context))
            elif span.kind == "chunk":
                mark = BLENDED_CONTEXT + context
                fresh.append(SpanToStore(span.start, span.end, span.chunk_id, mark))
        if not imports:
            return None
        to_store.extend(fresh)
        return Piece(start, end, "blend", tuple(imports))

    def _count_pool(self, seq: Sequence) -> None:
        """Chunk spans the prefix cache served when `seq` matched it."""
        cached, c = seq.num_cached_tokens, self.counters
        for span in seq.segments:
            if span.kind != "chunk":
                continue
            covered = max(0, min(span.end, cached) - span.start)
            c.pool_reused_tokens += covered
            if covered == span.end - span.start:
                c.pool_hits += 1
            else:
                c.pool_misses += 1

    def take(self, seq: Sequence, budget: int, alone: bool) -> ChunkStep | None:
        """This step's share of `seq`'s plan within `budget` tokens (nothing is changed
        until `commit`). A blend run is taken whole (after the compute before it, in the
        same step); it may pass the budget when it runs `alone` (no other prefill in its
        step). None when nothing fits (imports alone never make a step)."""
        plan = self.plan(seq)
        pos, i = plan.position, plan.index
        imports: list[KVImport] = []
        compute: list[tuple[int, int]] = []
        cost = 0
        blend: Piece | None = None
        recomputed = 0
        checked = stored = partial = False
        scored: tuple[bool, ...] = ()
        while i < len(plan.pieces):
            piece = plan.pieces[i]
            if piece.kind == "import":
                imports.extend(piece.imports)
                pos, i = piece.end, i + 1
            elif piece.kind == "compute":
                room = budget - cost
                if room <= 0:
                    break
                n = min(piece.end - pos, room)
                compute.append((pos, pos + n))
                cost += n
                pos += n
                if pos < piece.end:
                    break
                i += 1
            else:
                reused = sum(imp.end - imp.start for imp in piece.imports)
                sinks = len(sink_rows(piece.imports, self.sink_tokens))
                recomputed = num_blend_recomputed(self.ratio, reused, sinks)
                own = piece.end - piece.start - reused
                # blend_forward runs the check layers only when it chooses some of the
                # non-sink reused rows and not all of them: charged only then.
                chosen = recomputed - sinks
                checks = 0 < chosen < reused - sinks
                marks = self._scored(piece.imports) if checks else (False,) * len(piece.imports)
                choosing = [m for m in marks if m is not None]  # imports with rows to choose
                by_stored = checks and all(choosing)
                partly = checks and not by_stored and any(choosing)
                checks = checks and not by_stored
                # the check layers compute only the unscored imports' reused tokens
                pairs = zip(piece.imports, marks, strict=True)
                unscored = sum(imp.end - imp.start for imp, m in pairs if not m)
                check_cost = math.ceil(self.check_fraction * unscored) if checks else 0
                need = own + recomputed + check_cost
                if cost + need > budget and not alone:
                    break
                blend, cost, pos, i = piece, cost + need, piece.end, i + 1
                checked, stored, partial = checks, by_stored, partly
                scored = tuple(bool(m) for m in marks)
                imports.extend(piece.imports)
        if not compute and blend is None:
            return None
        return ChunkStep(
            advance=pos - plan.position,
            cost=cost,
            imports=imports,
            compute=compute,
            blend=blend,
            num_recomputed=recomputed,
            next_index=i,
            next_position=pos,
            blend_start=blend.start if blend is not None else None,
            checked=checked,
            by_stored=stored,
            scored=scored,
            partly_checked=partial,
        )

    def _scored(self, imports: tuple[KVImport, ...]) -> tuple[bool | None, ...]:
        """Per import of a blend that chooses rows: whether its stored scores choose them
        (every row chosen by score has one, and no refresh is due); None for an import with
        no row chosen by score (its sinks only): blend_forward sees rows, not imports, and
        such an import decides neither a stored-score blend nor a check."""
        sinks = set(sink_rows(imports, self.sink_tokens))

        def scored(imp: KVImport) -> bool | None:
            if all(p in sinks for p in range(imp.start, imp.end)):
                return None
            return imports_scored([imp], self.sink_tokens) and self.store.scores_fresh(imp.entry)

        return tuple(scored(imp) if self.stored_scores else False for imp in imports)

    def commit(self, seq: Sequence, step: ChunkStep) -> None:
        """The scheduler keeps `step`: advance the plan and count what it reuses."""
        plan = seq.chunk_plan
        assert plan is not None
        plan.index, plan.position = step.next_index, step.next_position
        reused = sum(imp.end - imp.start for imp in step.imports)
        plan.reused_tokens += reused
        plan.recomputed_tokens += step.num_recomputed
        seq.metrics.num_reused_tokens += reused
        seq.metrics.num_recomputed_tokens += step.num_recomputed
        self.counters.reused_tokens += reused
        self.counters.recomputed_tokens += step.num_recomputed
        if step.blend is None:
            return
        if step.checked:
            self.counters.checked_blends += 1
        if step.partly_checked:
            self.counters.partly_checked_blends += 1
        if step.by_stored:
            self.counters.stored_score_blends += 1
        for imp, scored in zip(step.blend.imports, step.scored, strict=True):
            if scored:  # its stored scores chose rows (a partial check's scored imports too)
                self.store.note_stored_use(imp.entry)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent compute pieces joined, so a prefill chunk may cross span boundaries."""
    out: list[Piece] = []
    for piece in pieces:
        if piece.start >= piece.end:
            continue
        if out and piece.kind == "compute" and out[-1].kind == "compute":
            out[-1] = Piece(out[-1].start, piece.end, "compute")
        else:
            out.append(piece)
    return out
