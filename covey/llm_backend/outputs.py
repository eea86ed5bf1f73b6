"""What the engine hands back per request and step."""

from __future__ import annotations

from dataclasses import dataclass

from covey.llm_backend.sequence import Sequence


@dataclass(frozen=True)
class RequestMetrics:
    """Seconds, measured with perf_counter; None until the event happened."""

    queue_time: float | None
    ttft: float | None
    tpot: float | None
    latency: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    num_reused_tokens: int = 0  # prompt tokens whose KV came from the chunk store
    num_recomputed_tokens: int = 0  # of the blended ones, recomputed on every layer

    @classmethod
    def of(cls, seq: Sequence) -> RequestMetrics:
        m = seq.metrics
        queue = m.first_scheduled_time - m.arrival_time if m.first_scheduled_time else None
        ttft = m.first_token_time - m.arrival_time if m.first_token_time else None
        end = m.finished_time
        n = seq.num_output_tokens
        tpot = (
            (end - m.first_token_time) / (n - 1) if end and m.first_token_time and n > 1 else None
        )
        return cls(
            queue_time=queue,
            ttft=ttft,
            tpot=tpot,
            latency=end - m.arrival_time if end else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=n,
            num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions,
            num_reused_tokens=m.num_reused_tokens,
            num_recomputed_tokens=m.num_recomputed_tokens,
        )


@dataclass(frozen=True)
class RequestOutput:
    """The state of one request after a step: the whole output so far plus this step's delta.

    A request that failed inside the engine finishes with reason "error" and `error` saying
    why; the requests that ran beside it are not affected. `choice_logprobs`: for choices
    scored as whole options, every option (in the caller's order) -> log P(option | prompt),
    the sum over its tokens; None otherwise. `healed_text`: the text token healing took off
    the prompt's end ("" when none): the first output token starts with it, `text` does not.
    """

    request_id: str
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None
    choice_logprobs: dict[str, float] | None = None
    healed_text: str = ""
