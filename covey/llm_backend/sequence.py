"""One request's state inside the engine (vLLM's names: block_table, num_cached_tokens)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from covey.llm_backend.choices import ChoiceTrie
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import SegmentSpan

if TYPE_CHECKING:
    from covey.llm_backend.chunk_planner import ChunkPlan
    from covey.llm_backend.option_scoring import OptionScorer
    from covey.llm_backend.token_healing import Healing


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # stopped for a tool call: keeps its KV, resumes with more tokens
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"
    PREFILLED = "prefilled"  # a prefill-only request: its KV is in the prefix cache
    ERROR = "error"  # it failed inside the engine; RequestOutput.error says why
    # Not finished: the turn ended and the request waits for a tool's result (pause_on_stop,
    # pause_at_end); resume_request continues it on the same context.
    PAUSED = "paused"


@dataclass
class SequenceMetrics:
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_reused_tokens: int = 0  # prompt tokens whose KV came from the chunk store
    num_recomputed_tokens: int = 0  # of those blended, recomputed on every layer


_ids = itertools.count()


class Sequence:
    """Token ids (prompt then output), KV blocks and progress of one request.

    `num_computed_tokens` counts tokens whose KV is in the pool; it is the scheduler's
    cursor. `num_cached_tokens` is how many of them came from the prefix cache.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        segments: list[SegmentSpan] | None = None,
        prefill_only: bool = False,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.segments = segments or []
        self.has_chunks = any(span.kind == "chunk" for span in self.segments)
        self.chunk_plan: ChunkPlan | None = None  # how its chunks get their KV (chunk_planner)
        # The first position whose KV was blended (not the exact KV of its tokens), once a
        # blend is committed; None while all its KV is exact. Never published from there on.
        self.inexact_from: int | None = None
        self.prefill_only = prefill_only  # compute the prompt's KV, sample nothing
        self.choice_trie: ChoiceTrie | None = None
        self.option_scorer: OptionScorer | None = None  # whole-option choices
        self.choice_logprobs: dict[str, float] | None = None  # set once options are scored
        self.healing: Healing | None = None  # token healing of a free generation
        self.healed_text = ""  # what token healing took off the prompt's end
        self.pin: str | None = None  # a prefill-only request's pin key
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.pause_tool: str | None = None  # while paused: the tool it waits for, if named
        self.paused_at: float | None = None  # while paused: when it paused (perf_counter)
        self.swapped_tokens = 0  # tokens whose KV waits in host memory (swapped out)
        self.discarded_tokens = 0  # tokens whose KV a pause freed: recomputed on resume
        self.metrics = SequenceMetrics()
        self.output_text = ""
        self.num_emitted_chars = 0  # of output_text, already streamed to the caller
        # Incremental detokenization cursors (see detokenizer.py); a little prompt context
        # makes the first output token decode as it would in running text.
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def fork_tokens(self) -> int:
        """KV tokens a fork of it takes once its prompt is computed: whole-option scoring's
        longest option but its last token (option_scoring.py), 0 without options. The
        scheduler reserves their blocks with the step that completes the prompt."""
        if self.option_scorer is None:
            return 0
        return self.option_scorer.max_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def start_new_turn(self, params: SamplingParams) -> None:
        """Make every token so far context: output text, counts and stops start afresh
        under `params`."""
        self.num_prompt_tokens = len(self.token_ids)
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        self.output_text = ""
        self.num_emitted_chars = 0
        self.metrics = SequenceMetrics()  # TTFT and TPOT of the new turn, not the tool's wait
        self.params = params
        self.finish_reason = None  # a turn that paused is over

    def sort_key(self) -> tuple[int, float]:
        """Lower priority value first (vLLM's convention), then first come first served."""
        return (self.priority, self.metrics.arrival_time)
