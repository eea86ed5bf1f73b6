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

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSeq], block_copies: list[tuple[int, int]]
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step; returns the sequences to sample and their logits [N, vocab]."""
        self.pool.copy_blocks(block_copies)
        inputs = self.prepare(scheduled)
        hidden = self.model(inputs.input_ids, inputs.positions, self.pool.kv, inputs.meta)
        if not inputs.sample_seqs:
            return [], None
        return inputs.sample_seqs, self.model.compute_logits(hidden[inputs.sample_indices])

    def execute_isolated(
        self, scheduled: list[ScheduledSeq], block_copies: list[tuple[int, int]]
    ) -> StepLogits:
        """`execute`, but a failure fails only the sequences that cause it.

        When the batched forward raises, each sequence is run again alone, with the block
        copies its own table needs. That is safe to repeat: writing the same tokens' KV to
        the same slots again gives the same pool, and no cursor has moved yet.
        """
        try:
            return StepLogits(*self.execute(scheduled, block_copies), {})
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
                sampled, logits = self.execute([item], copies)
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
        for item in decodes + prefills:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if end == len(seq) and not seq.prefill_only:
                sample_idx.append(len(ids) - 1)
                sample_seqs.append(seq)
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
        for item in prefills:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            if start == 0:
                meta.prefills.append(PrefillRun(offset, offset + n, None, None))
            else:
                blocks = torch.tensor(seq.block_table, dtype=torch.long, device=dev)  # [nb]
                q_pos = position_tensor[offset : offset + n]
                mask = torch.arange(start + n, device=dev)[None, :] <= q_pos[:, None]  # [n, L]
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
