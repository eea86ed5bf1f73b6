"""Turns a scheduled step into tensors, runs the model and returns the logits to sample.

Decodes (one new token each) go first and share one batched attention call; prefill
chunks follow, each with its own run. Logits are computed only for sequences whose last
token was computed this step: partial prefill chunks need none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.blend_forward import BlendRegion, blend_forward
from covey.llm_backend.chunk_transfer import ChunkTransfer
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.scheduler import ScheduledSeq
from covey.llm_backend.sequence import Sequence

log = logging.getLogger(__name__)


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
        self.blend_check_layers: tuple[int, ...] = (1,)

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        block_copies: list[tuple[int, int]],
        chunk_items: list[ScheduledSeq] | None = None,
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step; returns the sequences to sample and their logits [N, vocab].

        `chunk_items`: the scheduled items with a chunk step. Their imports are written
        first; a blend run goes through `blend_forward` on its own, the rest in one batch.
        """
        self.pool.copy_blocks(block_copies)
        seqs: list[Sequence] = []
        hidden_rows: list[torch.Tensor] = []
        if chunk_items:
            scheduled = self._run_chunk_items(scheduled, chunk_items, seqs, hidden_rows)
        if scheduled:
            inputs = self.prepare(scheduled)
            hidden = self.model(inputs.input_ids, inputs.positions, self.pool.kv, inputs.meta)
            if not hidden_rows:
                if not inputs.sample_seqs:
                    return [], None
                return inputs.sample_seqs, self.model.compute_logits(hidden[inputs.sample_indices])
            seqs += inputs.sample_seqs
            hidden_rows.append(hidden[inputs.sample_indices])
        if not seqs:
            return [], None
        return seqs, self.model.compute_logits(torch.cat(hidden_rows))

    def _run_chunk_items(
        self,
        scheduled: list[ScheduledSeq],
        chunk_items: list[ScheduledSeq],
        seqs: list[Sequence],
        hidden_rows: list[torch.Tensor],
    ) -> list[ScheduledSeq]:
        """Import the chunk steps' KV and run their blends; returns the items left to run
        (blends appended their sequence and last hidden state to `seqs`/`hidden_rows`)."""
        assert self.chunks is not None
        blends = []
        for item in chunk_items:
            step = item.chunk
            assert step is not None
            for imp in step.imports:
                self.chunks.import_kv(item.seq, imp)
            if step.blend is not None:
                blends.append(item)
        for item in blends:
            seqs.append(item.seq)
            hidden_rows.append(self._blend(item))
        if not blends:
            return scheduled
        return [item for item in scheduled if item.chunk is None or item.chunk.blend is None]

    def _blend(self, item: ScheduledSeq) -> torch.Tensor:
        """The blend run of `item`'s chunk step; returns its last token's hidden [1, H]."""
        step, seq, dev = item.chunk, item.seq, self.device
        assert step is not None and step.blend is not None and self.chunks is not None
        start, end = step.blend.start, step.blend.end
        reused = torch.zeros(end - start, dtype=torch.bool)
        for imp in step.blend.imports:
            reused[imp.start - start : imp.end - start] = True
        region = BlendRegion(
            input_ids=torch.tensor(seq.token_ids[start:end], dtype=torch.long, device=dev),
            positions=torch.arange(start, end, device=dev),
            slots=self.chunks.slots(seq, start, end),
            key_blocks=torch.tensor(seq.block_table, dtype=torch.long, device=dev),
            reused=reused.to(dev),
        )
        result = blend_forward(
            self.model,
            self.pool.kv,
            region,
            self.blend_ratio,
            self.blend_check_layers,
            self.block_size,
        )
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
            return StepLogits(*self.execute(scheduled, block_copies, chunk_items), {})
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
                sampled, logits = self.execute([item], copies, alone)
            except Exception as exc:
                failed[item.seq.seq_id] = exc
                continue
            seqs += sampled
            if logits is not None:
                rows.append(logits)
        return StepLogits(seqs, torch.cat(rows) if rows else None, failed)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        for item in decodes:
            seq, start = item.seq, item.seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_ids[start])
            positions.append(start)
            slots.append(table[start // bs] * bs + start % bs)
            if start + 1 == len(seq) and not seq.prefill_only:
                sample_idx.append(len(ids) - 1)
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
            fresh = start == 0 and (chunk is None or (len(ranges) == 1 and not chunk.imports))
            runs.append((seq, n, 0 if fresh else end))
        dev = self.device
        position_tensor = torch.tensor(positions, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=len(decodes),
            block_size=bs,
            decode_blocks=None,
            decode_padding=None,
            prefills=[],
        )
        if decodes:
            meta.decode_blocks, meta.decode_padding = self._decode_keys([d.seq for d in decodes])
        offset = len(decodes)
        for seq, n, length in runs:
            if length == 0:  # from position 0 with nothing in the pool: its own keys only
                meta.prefills.append(PrefillRun(offset, offset + n, None, None))
            else:
                blocks = torch.tensor(seq.block_table, dtype=torch.long, device=dev)  # [nb]
                q_pos = position_tensor[offset : offset + n]
                mask = torch.arange(length, device=dev)[None, :] <= q_pos[:, None]  # [n, L]
                meta.prefills.append(PrefillRun(offset, offset + n, blocks, mask))
            offset += n
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=position_tensor,
            meta=meta,
            sample_indices=torch.tensor(sample_idx, dtype=torch.long, device=dev),
            sample_seqs=sample_seqs,
        )

    def _decode_keys(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        max_blocks = max(len(s.block_table) for s in seqs)
        table = torch.tensor(
            [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs],
            dtype=torch.long,
            device=self.device,
        )  # [D, MB]
        lengths = [s.num_computed_tokens + 1 for s in seqs]
        if all(n == max_blocks * self.block_size for n in lengths):
            return table, None  # every key is real: no mask to apply
        lens = torch.tensor(lengths, device=self.device)
        keys = torch.arange(max_blocks * self.block_size, device=self.device)
        padding = keys[None, :] >= lens[:, None]  # [D, MB * bs]
        return table, padding[None, :, None, :]  # [D, MB], [1, D, 1, MB * bs]
