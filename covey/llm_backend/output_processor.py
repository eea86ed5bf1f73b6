"""From a sampled token to what the caller sees: text, stop decisions, `RequestOutput`.

Plain Python over a `Sequence` and a tokenizer (no model, no torch), so it is tested on its
own. The engine decides nothing here: it appends each sampled token through
`append_token`, finishes the sequence when a stop reason comes back, then asks for the
output. Streamed text is never taken back: while a stop string could still begin in the
last characters, they are held back until it is clear.
"""

from __future__ import annotations

import time

from covey.llm_backend.detokenizer import detokenize_step
from covey.llm_backend.outputs import RequestMetrics, RequestOutput
from covey.llm_backend.sequence import FinishReason, Sequence
from covey.llm_backend.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int) -> None:
        """`tokenizer` None (dummy weights): outputs are token ids only, with no text."""
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id if tokenizer is not None else None
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, token: int) -> FinishReason | None:
        """Add a sampled token to `seq` and detokenize it; return why `seq` stops, if it does.

        Mutates `seq`: token_ids, output_text (cut at a stop string, or set to the finished
        choice), the detokenizer's offsets and the first-token time.
        """
        seq.token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = time.perf_counter()
        if self.tokenizer is not None:
            detokenize_step(self.tokenizer, seq)
        return self._stop_reason(seq, token)

    def pauses(self, seq: Sequence, token: int, reason: FinishReason) -> bool:
        """Whether the turn that `reason` just ended pauses `seq` instead of finishing it
        (`pause_at_end`: any end; `pause_on_stop`: a stop string or stop token id, not EOS
        nor a finished choice). A sequence at the context window finishes: nothing fits
        after it."""
        p = seq.params
        if not (p.pause_on_stop or p.pause_at_end) or len(seq) >= self.max_model_len:
            return False
        if p.pause_at_end:
            return True
        eos = not p.ignore_eos and token == self.eos and token not in p.stop_token_ids
        return reason is FinishReason.STOP and seq.choice_trie is None and not eos

    def output(
        self, seq: Sequence, delta_ids: list[int], error: str | None = None
    ) -> RequestOutput:
        """`seq`'s state for the caller: the whole output so far and this step's delta.
        Call it after finishing `seq`, so a finished request releases its held-back text."""
        return RequestOutput(
            request_id=seq.request_id,
            text=seq.output_text,
            token_ids=seq.output_token_ids,
            delta_text=self._release_text(seq),
            delta_token_ids=delta_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            metrics=RequestMetrics.of(seq),
            error=error,
        )

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if seq.choice_trie is not None:
            choice = seq.choice_trie.finished_choice(seq.output_token_ids)
            if choice is None:
                return None
            seq.output_text = choice  # exactly the choice, whatever the detokenizer made
            return FinishReason.STOP
        if not p.ignore_eos and token == self.eos or token in p.stop_token_ids:
            return FinishReason.STOP
        if p.stop and self._cut_at_stop_string(seq):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        """Truncate the output at the earliest stop string, searching only the new tail."""
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, seq.num_emitted_chars - longest + 1)
        hits = [(at, s) for s in seq.params.stop if (at := seq.output_text.find(s, start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        keep = at + len(stop) if seq.params.include_stop_str_in_output else at
        seq.output_text = seq.output_text[:keep]
        return True

    def _release_text(self, seq: Sequence) -> str:
        """The next text delta. While stop strings are set, the last len(stop) - 1 characters
        wait: a stop string may begin there, and streamed text must never be taken back. A
        choice streams whole when it is complete: its text is the choice string itself. A
        turn that ended (finished or paused) releases everything held back."""
        turn_over = seq.is_finished or seq.finish_reason is FinishReason.PAUSED
        if seq.choice_trie is not None and not turn_over:
            return ""
        end = len(seq.output_text)
        if seq.params.stop and not turn_over:
            end = max(seq.num_emitted_chars, end - max(len(s) for s in seq.params.stop) + 1)
        delta = seq.output_text[seq.num_emitted_chars : end]
        seq.num_emitted_chars = end
        return delta
