"""Turns a scheduled step into tensors, runs the model and returns the logits to sample.

Decodes (one new token each) go first and share one batched attention call; prefill
chunks follow, each with its own run. Logits are computed only for sequences whose last
token was computed this step: partial prefill chunks need none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice

import torch

from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup, PrefillRun
from covey.llm_backend.blend_forward import (
    BlendPolicy,
    BlendRegion,
    blend_forward,
    default_check_layers,
)
from covey.llm_backend.chunk_planner import record_scores, sink_rows, stored_region_scores
from covey.llm_backend.chunk_transfer import ChunkTransfer
from covey.llm_backend.compiled_decode import CompiledDecode
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.scheduler import ScheduledSeq
from covey.llm_backend.sequence import Sequence

log = logging.getLogger(__name__)

# A decode group stops growing once its rows would compute this many padded keys in all:
# one more group costs ~55 us of dispatch per layer, a padded key ~0.15 us (measured, bf16).
DECODE_PAD_BUDGET = 256
# A lone decode row whose blocks lie in at most this many stretches of pool order reads them
# stretch by stretch (`attend_spans`), not gathered block by block. Typical: a prefix-cache
# hit's blocks (a system prompt, an earlier turn), then the sequence's own. A helper's
# scratch timing, not a committed result: each stretch costs a slice and a piece of one
# copy (~3 us a layer); one layer at one thread (bf16, SmolLM2's heads, fastest of 80 runs),
# 2 stretches 73/129/162 us at 64/800/1300 keys against the gather's 77/137/224;
# 4 stretches 77/137/169, even with the gather up to 800.
MAX_DECODE_SPANS = 4


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] flat index of each sampled sequence's last token
    sample_seqs: list[Sequence]


@dataclass
class StepLogits:
    """What one step's forward pass gives the sampler. `failed`: sequences whose forward
    raised (seq_id -> why); they are not in `seqs` and must be finished with an error."""

    seqs: list[Sequence]  # the sequences to sample, one per logits row
    logits: torch.Tensor | None  # [N, vocab]; None when no sequence samples this step
    failed: dict[int, Exception]


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.block_size = pool.block_size
        self.chunks: ChunkTransfer | None = None  # set when the engine has a chunk store
        self.blend_ratio = 0.0
        # The engine sets EngineConfig's (with the chunk cache on, the only user); until
        # then the same default it would pick.
        self.blend_check_layers = default_check_layers(model.args.num_layers)
        self.blend_sink_tokens = 0
        self.blend_policy = BlendPolicy()
        self.blend_stored_scores = False  # EngineConfig.blend_stored_scores
        self._scores_warned = False
        self.compiled: CompiledDecode | None = None  # set when EngineConfig.compile
        # Pure decode steps run so far, and how many of them ran the compiled graph: the
        # compiled step exists does not mean it ran (wider batches, another thread count).
        self.decode_steps = 0

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        block_copies: list[tuple[int, int]],
        chunk_items: list[ScheduledSeq] | None = None,
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step; returns the sequences to sample and their logits [N, vocab].

        `chunk_items`: the scheduled items with a chunk step. Their imports are written
        first; then the batch runs, then each blend run on its own (`blend_forward`), once
        the batch has computed what precedes its region.
        """
        self.pool.copy_blocks(block_copies)
        blends: list[ScheduledSeq] = []
        if chunk_items:
            scheduled, blends = self._import_chunks(scheduled, chunk_items)
        seqs: list[Sequence] = []
        hidden_rows: list[torch.Tensor] = []
        if scheduled:
            inputs = self.prepare(scheduled)
            forward = self.model.forward
            self.decode_steps += inputs.meta.num_decode == len(inputs.input_ids)
            if self._compiled_step(inputs):
                forward = self.compiled.forward
            hidden = forward(inputs.input_ids, inputs.positions, self.pool.kv, inputs.meta)
            if not blends:
                if not inputs.sample_seqs:
                    return [], None
                return inputs.sample_seqs, self.model.compute_logits(hidden[inputs.sample_indices])
            seqs += inputs.sample_seqs
            hidden_rows.append(hidden[inputs.sample_indices])
        for item in blends:  # after the batch, which computed what precedes their regions
            seqs.append(item.seq)
            hidden_rows.append(self._blend(item))
        if not seqs:
            return [], None
        return seqs, self.model.compute_logits(torch.cat(hidden_rows))

    @property
    def compiled_steps(self) -> int:
        """Decode steps that ran the compiled graph (not its eager fallback)."""
        return 0 if self.compiled is None else self.compiled.compiled_steps

    def _compiled_step(self, inputs: StepInputs) -> bool:
        """Whether the compiled decode step runs this step: a pure decode step (no prefill
        tokens) no wider than the compiled graph's batch limit."""
        n = len(inputs.input_ids)
        return (
            self.compiled is not None
            and inputs.meta.num_decode == n
            and n <= self.compiled.max_batch
        )

    def _import_chunks(
        self, scheduled: list[ScheduledSeq], chunk_items: list[ScheduledSeq]
    ) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
        """Write the chunk steps' imports into the pool; returns the items for the batched
        forward (a blend step's tokens before its region among them) and the blend steps."""
        assert self.chunks is not None
        blends = []
        for item in chunk_items:
            step = item.chunk
            assert step is not None
            for imp in step.imports:
                self.chunks.import_kv(item.seq, imp)
            if step.blend is not None:
                blends.append(item)
        if blends:
            scheduled = [
                item
                for item in scheduled
                if item.chunk is None or item.chunk.blend is None or item.chunk.compute
            ]
        return scheduled, blends

    def _blend(self, item: ScheduledSeq) -> torch.Tensor:
        """The blend run of `item`'s chunk step; returns its last token's hidden [1, H]."""
        step, seq, dev = item.chunk, item.seq, self.device
        assert step is not None and step.blend is not None and self.chunks is not None
        start, end = step.blend.start, step.blend.end
        reused = torch.zeros(end - start, dtype=torch.bool)
        groups = torch.full((end - start,), -1, dtype=torch.long)
        for i, imp in enumerate(step.blend.imports):
            reused[imp.start - start : imp.end - start] = True
            groups[imp.start - start : imp.end - start] = i
        forced = torch.zeros(end - start, dtype=torch.bool)
        forced[[p - start for p in sink_rows(step.blend.imports, self.blend_sink_tokens)]] = True
        region = BlendRegion(
            input_ids=torch.tensor(seq.token_ids[start:end], dtype=torch.long, device=dev),
            positions=torch.arange(start, end, device=dev),
            slots=self.chunks.slots(seq, start, end),
            key_blocks=torch.tensor(seq.block_table, dtype=torch.long, device=dev),
            reused=reused.to(dev),
            forced=forced.to(dev),
            groups=groups.to(dev),
        )
        if self.blend_stored_scores:
            # Stored scores choose only the imports the planner marked scored; the others
            # are NaN (a refresh due measures again, though it has scores), so blend_forward
            # runs the check layers over them (all NaN: a full check) and returns scores.
            scored = [imp for imp, m in zip(step.blend.imports, step.scored, strict=True) if m]
            stored = stored_region_scores(scored, start, end)
            region.stored_scores = stored.to(dev)
        result = blend_forward(
            self.model,
            self.pool.kv,
            region,
            self.blend_ratio,
            self.blend_check_layers,
            self.block_size,
            self.blend_policy,
        )
        if self.blend_stored_scores and result.scores is not None and not step.scores_recorded:
            step.scores_recorded = True  # a retried step (execute_isolated) adds none again
            try:
                record_scores(self.chunks.store, step.blend.imports, start, result.scores)
            except Exception:  # scores are a hint: never fail a forward that succeeded
                if not self._scores_warned:
                    self._scores_warned = True
                    log.warning("blend: storing scores failed (logged once)", exc_info=True)
        return result.hidden

    def execute_isolated(
        self,
        scheduled: list[ScheduledSeq],
        block_copies: list[tuple[int, int]],
        chunk_items: list[ScheduledSeq] | None = None,
    ) -> StepLogits:
        """`execute`, but a failure fails only the sequences that cause it.

        When the batched forward raises, each sequence is run again alone, with the block
        copies its own table needs. That is safe to repeat: writing the same tokens' KV to
        the same slots again gives the same pool (imports are written again first), and no
        cursor has moved yet.
        """
        try:
            return StepLogits(*self._execute(scheduled, block_copies, chunk_items), {})
        except Exception:
            log.warning(
                "batched forward failed; rerunning its sequences one at a time", exc_info=True
            )
        seqs: list[Sequence] = []
        rows: list[torch.Tensor] = []
        failed: dict[int, Exception] = {}
        for item in scheduled:
            table = set(item.seq.block_table)
            copies = [c for c in block_copies if c[1] in table]
            try:
                alone = [item] if item.chunk is not None else None
                sampled, logits = self._execute([item], copies, alone)
            except Exception as exc:
                failed[item.seq.seq_id] = exc
                continue
            seqs += sampled
            if logits is not None:
                rows.append(logits)
        return StepLogits(seqs, torch.cat(rows) if rows else None, failed)

    def _execute(
        self,
        scheduled: list[ScheduledSeq],
        block_copies: list[tuple[int, int]],
        chunk_items: list[ScheduledSeq] | None,
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """`execute`, naming chunk items only when there are some (so a step without chunks
        calls `execute` exactly as before they existed)."""
        if chunk_items:
            return self.execute(scheduled, block_copies, chunk_items)
        return self.execute(scheduled, block_copies)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        # Longest first, so that groups of similar length are contiguous rows; sampling
        # keeps the scheduled order.
        order = sorted(
            range(len(decodes)), key=lambda i: decodes[i].seq.num_computed_tokens, reverse=True
        )
        row_of = [0] * len(decodes)
        for row, i in enumerate(order):
            seq = decodes[i].seq
            start = seq.num_computed_tokens
            ids.append(seq.token_ids[start])
            positions.append(start)
            slots.append(seq.block_table[start // bs] * bs + start % bs)
            row_of[i] = row
        for i, item in enumerate(decodes):
            seq = item.seq
            if seq.num_computed_tokens + 1 == len(seq) and not seq.prefill_only:
                sample_idx.append(row_of[i])
                sample_seqs.append(seq)
        runs: list[tuple[Sequence, int, int]] = []  # a prefill's (seq, queries, key length)
        for item in prefills:
            seq, start = item.seq, item.seq.num_computed_tokens
            table = seq.block_table
            # A chunk step computes only some of the tokens it moves past: the rest are
            # imported from the chunk store before the forward.
            chunk = item.chunk
            ranges = [(start, start + item.num_new_tokens)] if chunk is None else chunk.compute
            n = 0
            for a, b in ranges:
                ids.extend(seq.token_ids[a:b])
                positions.extend(range(a, b))
                slots.extend(table[p // bs] * bs + p % bs for p in range(a, b))
                n += b - a
            end = ranges[-1][1]
            if end == len(seq) and not seq.prefill_only:
                sample_idx.append(len(ids) - 1)
                sample_seqs.append(seq)
            # From position 0 in one range, a run sees only its own keys (imports lie after).
            fresh = len(ranges) == 1 and ranges[0][0] == 0
            runs.append((seq, n, 0 if fresh else end))
        dev = self.device
        position_tensor = torch.tensor(positions, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=len(decodes),
            block_size=bs,
            prefills=[],
            decode_groups=self._decode_groups([decodes[i].seq for i in order]),
        )
        offset = len(decodes)
        for seq, n, length in runs:
            if length == 0:  # from position 0 with nothing in the pool: its own keys only
                meta.prefills.append(PrefillRun(offset, offset + n, None, None))
            else:
                blocks = torch.tensor(seq.block_table, dtype=torch.long, device=dev)  # [nb]
                q_pos = position_tensor[offset : offset + n]  # true positions: no [n, L] mask
                meta.prefills.append(PrefillRun(offset, offset + n, blocks, positions=q_pos))
            offset += n
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=position_tensor,
            meta=meta,
            sample_indices=torch.tensor(sample_idx, dtype=torch.long, device=dev),
            sample_seqs=sample_seqs,
        )

    def _decode_groups(self, seqs: list[Sequence]) -> list[DecodeGroup]:
        """Split decode rows (longest first) into groups that pad little: a group takes
        shorter rows until their padded keys would pass DECODE_PAD_BUDGET."""
        groups = []
        start = 0
        while start < len(seqs):
            longest = seqs[start].num_computed_tokens + 1
            end, waste = start + 1, 0
            while end < len(seqs):
                waste += longest - (seqs[end].num_computed_tokens + 1)
                if waste > DECODE_PAD_BUDGET:
                    break
                end += 1
            groups.append(self._decode_group(seqs[start:end], start))
            start = end
        return groups

    def _decode_group(self, seqs: list[Sequence], start: int) -> DecodeGroup:
        bs, dev = self.block_size, self.device
        lengths = [s.num_computed_tokens + 1 for s in seqs]
        length = lengths[0]
        mb = -(-length // bs)
        if len(seqs) == 1:
            spans = _slot_spans(seqs[0].block_table[:mb], length, bs, MAX_DECODE_SPANS)
            if spans is not None and len(spans) == 1:  # read in place, no gather
                return DecodeGroup(start, start + 1, None, length, None, spans[0][0])
            if spans is not None:  # a few stretches: copied whole, no gather
                return DecodeGroup(start, start + 1, None, length, None, spans=spans)
        rows = [s.block_table[:mb] for s in seqs]
        blocks = torch.tensor(
            [r + [0] * (mb - len(r)) for r in rows], dtype=torch.long, device=dev
        )  # [n, MB]
        if all(n == length for n in lengths):
            return DecodeGroup(start, start + len(seqs), blocks, length, None)
        lens = torch.tensor(lengths, device=dev)
        padding = torch.arange(length, device=dev)[None, :] >= lens[:, None]  # [n, L]
        return DecodeGroup(start, start + len(seqs), blocks, length, padding[None, :, None, :])


def _slot_spans(
    table: list[int], length: int, bs: int, most: int
) -> tuple[tuple[int, int], ...] | None:
    """The pool slot ranges [a, b) holding the first `length` keys of block table `table`
    (`length` falls in its last block), consecutive blocks merged: one range when the
    blocks lie in pool order; None when there would be more than `most` ranges (the caller
    gathers then, so they are not built). Runs every decode step: list operations, no
    per-block loop in Python where the table is in order (~1 us against ~40 for 80 blocks),
    and a scattered table stops at its `most`-th break."""
    first = table[0]
    if table == list(range(first, first + len(table))):
        return ((first * bs, first * bs + length),)
    breaks = (i for i, (a, b) in enumerate(zip(table, table[1:]), 1) if b != a + 1)
    starts = [0, *islice(breaks, most)]  # `most` breaks already make one range too many
    if len(starts) > most:
        return None
    ends = [*starts[1:], len(table)]
    spans = [(table[a] * bs, table[b - 1] * bs + bs) for a, b in zip(starts, ends, strict=True)]
    spans[-1] = (spans[-1][0], spans[-1][1] - (len(table) * bs - length))
    return tuple(spans)
