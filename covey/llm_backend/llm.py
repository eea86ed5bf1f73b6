"""`LLM`: the synchronous, batch-at-once face of the engine (like vLLM's `LLM`)."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from covey.errors import InvalidRequestError
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine, Prompt
from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment

Messages = list[dict[str, str]]


class LLM:
    """Load a model once, then `generate` batches of prompts or `chat` with messages.

    `LLM()` is the embedded SmolLM2-135M-Instruct; keyword arguments go to EngineConfig.
    """

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together (continuous batching); outputs come back in input order.

        A bad prompt or parameter raises InvalidRequestError before anything runs. A request
        that fails inside the engine comes back finished with reason "error" and `error`
        set; the others are unaffected.
        """
        batch = _as_batch(prompts)
        if not batch:
            raise InvalidRequestError("generate() needs at least one prompt")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(batch)
        if len(plist) != len(batch):
            raise InvalidRequestError(f"{len(batch)} prompts but {len(plist)} SamplingParams")
        priorities = [0] * len(batch) if priority is None else priority
        if isinstance(priorities, (str, bytes)) or not isinstance(priorities, SequenceABC):
            raise InvalidRequestError(f"priority must be a list of ints, got {priority!r}")
        if len(priorities) != len(batch):
            raise InvalidRequestError(
                f"priority has {len(priorities)} entries for {len(batch)} prompts"
            )
        ids = []
        try:
            for i, (prompt, p, prio) in enumerate(zip(batch, plist, priorities)):
                try:
                    ids.append(self.engine.add_request(prompt, p, priority=prio))
                except InvalidRequestError as exc:
                    msg = f"prompt {i}: {exc}" if len(batch) > 1 else str(exc)
                    raise InvalidRequestError(msg) from exc
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self.engine.run_to_completion(ids)

    def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        """Make the chunk store hold these chunk segments' KV (see `LLMEngine.warm_chunks`)."""
        return self.engine.warm_chunks(chunks, compute)

    def close(self) -> None:
        """Close the engine's chunk store (its disk tier keeps what host memory held)."""
        self.engine.close()

    def chat(
        self, messages: Messages | list[Messages], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Answer one conversation or a batch of them through the model's chat template."""
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so no chat template")
        if not isinstance(messages, list):
            raise InvalidRequestError(f"chat messages must be a list of dicts, got {messages!r}")
        if not messages:
            raise InvalidRequestError("chat messages must not be empty")
        convs = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params)


def _as_batch(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    """One prompt (str, token ids, segments) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, SequenceABC):
        raise InvalidRequestError(
            "prompts must be a str, a list of token ids or of Segments, or a list of those; "
            f"got {type(prompts).__name__}"
        )
    if prompts and not isinstance(prompts[0], (str, list)):
        return [list(prompts)]  # type: ignore[list-item]  # one prompt: token ids or segments
    return list(prompts)  # type: ignore[arg-type]
