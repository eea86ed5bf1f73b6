"""Every check a request passes before the engine takes it, in one place.

A request that passes here cannot fail inside a batched step for a reason of its own: its
prompt tokenizes to ids the model's embedding table holds, it fits the context window, and
its largest KV footprint fits the pool (pinned prefixes yield to it). `add_request`,
`add_prefill` and `resume_request` each make one call here (`check`, `check_prefill`,
`check_resume`) and get back everything checked; the request-id check is shared with
`AsyncLLM`, which must not hand one id to two streams.
"""

from __future__ import annotations

import uuid
from collections.abc import Container
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from covey.checks import as_int
from covey.errors import InvalidRequestError
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.choices import ChoiceTrie
from covey.llm_backend.option_scoring import OptionScorer, use_trie
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment, SegmentSpan
from covey.llm_backend.token_healing import Healing, heal
from covey.llm_backend.token_ids import as_token_ids, check_in_vocab
from covey.llm_backend.tokenizer import Tokenizer


@dataclass(frozen=True)
class CheckedRequest:
    """A request the engine can take: its id and priority, its prompt's ids and where its
    segments lie, its choice trie, and (a prefill only) the pin to hold its blocks under.
    Choices are either a trie or an option scorer (whole-option scoring); `healing`: the
    token healing applied to the prompt (its last token is already removed)."""

    request_id: str
    priority: int
    token_ids: list[int]
    spans: list[SegmentSpan]
    choice_trie: ChoiceTrie | None
    pin: str | None = None
    option_scorer: OptionScorer | None = None
    healing: Healing | None = None


def check_request_id(request_id: str | None, in_use: Container[str]) -> str:
    """The id to use (a fresh one for None); refuses a non-str id or one `in_use`."""
    if request_id is None:
        return uuid.uuid4().hex
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError(f"request_id must be a non-empty str, got {request_id!r}")
    if request_id in in_use:
        raise InvalidRequestError(f"request id {request_id!r} is already in use")
    return request_id


def check_priority(priority: object) -> int:
    """An int (numpy integers too); lower runs first."""
    return as_int("priority", priority)


class RequestValidator:
    """Checks requests (ids, priorities, prompts, sampling parameters, pins) against one
    engine's model and pool."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        max_model_len: int,
        block_manager: BlockManager,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_manager = block_manager

    def check(
        self,
        prompt: object,
        params: object,
        request_id: str | None,
        priority: object,
        in_use: Container[str],
    ) -> CheckedRequest:
        """A new request to generate from; `in_use` holds the ids the engine has taken."""
        request_id = check_request_id(request_id, in_use)
        priority = check_priority(priority)
        return self._check_prompt(prompt, params, request_id, priority, context=0)

    def check_resume(
        self, extra: object, params: object, request_id: str, priority: int, context: int
    ) -> CheckedRequest:
        """More prompt for a held request (a tool's result) on top of the `context`
        tokens it already holds; its id and priority stay as they are."""
        return self._check_prompt(extra, params, request_id, priority, context)

    def _check_prompt(
        self, prompt: object, params: object, request_id: str, priority: int, context: int
    ) -> CheckedRequest:
        """A prompt to generate from, after `context` tokens already held (a resumed
        request's history; 0 for a new request, whose prompt must not be empty)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {params!r}")
        ids, spans = self.tokenize(prompt)
        if not ids and not context:
            raise InvalidRequestError("the prompt is empty")
        healing = None
        if params.token_healing and self.tokenizer is not None:
            healed = heal(self.tokenizer, ids, spans)
            if healed is not None:
                ids, spans, healing = healed
        for span in spans:
            if span.kind == "chunk":
                self._check_chunk_length(span.end - span.start, span.chunk_id)
        total = context + len(ids)
        what = "the resumed request" if context else "the prompt"
        if total >= self.max_model_len:
            raise InvalidRequestError(
                f"{what} has {total} tokens; the context window is {self.max_model_len} "
                "tokens and at least one must be left to generate"
            )
        check_in_vocab("stop_token_ids", params.stop_token_ids, self.vocab_size)
        trie, scorer = self._choices(params, healing.text if healing else "")
        choice_tokens = trie.max_tokens if trie else scorer.max_tokens if scorer else 0
        if choice_tokens and total + choice_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"{what} has {total} tokens and its choices need up to {choice_tokens} "
                f"more; the context window is {self.max_model_len} tokens"
            )
        needed = min(total + (choice_tokens or params.max_tokens), self.max_model_len)
        if scorer is not None:  # an option's fork may copy the prompt's last block
            needed += self.block_manager.block_size
        self.check_pool(needed, "the resumed request" if context else "the request")
        return CheckedRequest(
            request_id, priority, ids, spans, trie, option_scorer=scorer, healing=healing
        )

    def check_prefill(
        self,
        prompt: object,
        request_id: str | None,
        priority: object,
        pin: object,
        in_use: Container[str],
    ) -> CheckedRequest | None:
        """A prompt to prefill into the prefix cache: cut to whole blocks (only those are
        cached), within the context window. None when there is nothing to do: `pin` is
        already pinned (then it becomes the most recently asked-for pin, the last to yield;
        checked before tokenizing, so a repeated pin costs none, but after the other
        arguments, so a bad one is refused every time) or no whole block is left."""
        if pin is not None and not isinstance(pin, str):
            raise InvalidRequestError(f"pin must be a str key, got {pin!r}")
        bm = self.block_manager
        if bm.trie is None:
            raise InvalidRequestError("early prefill needs enable_prefix_caching=True")
        request_id = check_request_id(request_id, in_use)
        priority = check_priority(priority)
        if pin is not None and bm.refresh_pin(pin):
            return None
        ids, spans = self.tokenize(prompt)
        ids = ids[: min(len(ids), self.max_model_len - 1) // bm.block_size * bm.block_size]
        if not ids:
            return None
        self.check_pool(len(ids), "the prefill")
        spans = [sp for sp in spans if sp.start < len(ids)]
        return CheckedRequest(request_id, priority, ids, spans, None, pin)

    def check_chunk(self, chunk: object) -> list[int]:
        """A chunk to warm on its own: a Segment that fits the context window with a token
        to spare. Returns its token ids."""
        if not isinstance(chunk, Segment):
            raise InvalidRequestError(f"a chunk to warm is a Segment, got {type(chunk).__name__}")
        ids, _ = self.tokenize([chunk])
        if not ids:
            raise InvalidRequestError(f"chunk {chunk.chunk_id!r} is empty")
        self._check_chunk_length(len(ids), chunk.chunk_id)
        self.check_pool(len(ids), f"chunk {chunk.chunk_id!r}")
        return ids

    def _check_chunk_length(self, n: int, chunk_id: str | None) -> None:
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"chunk {chunk_id!r} has {n} tokens; the context window is "
                f"{self.max_model_len} tokens: split it into smaller chunks"
            )

    def check_pool(self, needed: int, what: str) -> None:
        """Refuse what could never fit: more than the whole pool. Pinned blocks count as
        room, since pins yield to requests (see BlockManager)."""
        bm = self.block_manager
        capacity = bm.num_blocks * bm.block_size
        if needed > capacity:
            raise InvalidRequestError(
                f"{what} needs KV for {needed} tokens but the pool holds {capacity}; "
                "lower max_tokens or raise kv_cache_tokens"
            )

    def tokenize(self, prompt: object) -> tuple[list[int], list[SegmentSpan]]:
        """Token ids of a prompt (text, token ids or Segments) and where each segment lies."""
        if isinstance(prompt, str):
            return self.encode(prompt, "the prompt"), []
        if not isinstance(prompt, SequenceABC) or isinstance(prompt, bytes):
            raise InvalidRequestError(
                f"a prompt is a str, a list of token ids or of Segments, "
                f"got {type(prompt).__name__}"
            )
        if prompt and all(isinstance(p, Segment) for p in prompt):
            ids: list[int] = []
            spans: list[SegmentSpan] = []
            for i, seg in enumerate(prompt):
                if seg.token_ids is not None:
                    piece = list(seg.token_ids)
                    check_in_vocab(f"prompt segment {i}", piece, self.vocab_size)
                else:
                    piece = self.encode(seg.text or "", f"prompt segment {i}")
                spans.append(SegmentSpan(seg.kind, len(ids), len(ids) + len(piece), seg.chunk_id))
                ids.extend(piece)
            return ids, spans
        ids = list(as_token_ids("the prompt", prompt))
        check_in_vocab("the prompt", ids, self.vocab_size)
        return ids, []

    def encode(self, text: str, field: str) -> list[int]:
        """Token ids of `text`; `field` names it in errors (a lone surrogate cannot be
        encoded as UTF-8, which the tokenizer needs)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{field} is not valid Unicode: {exc.reason} at character {exc.start}"
            ) from None
        return self.tokenizer.encode(text)

    def _choices(
        self, params: SamplingParams, healed: str
    ) -> tuple[ChoiceTrie | None, OptionScorer | None]:
        """The trie or the option scorer for `params.choices` (see option_scoring.py for
        which); `healed`: the text token healing removed from the prompt, which every
        option is tokenized after."""
        if not params.choices:
            return None, None
        if self.tokenizer is None:  # encode raises the clear error
            self.encode("", "choices")

        def encode(text: str) -> list[int]:
            return self.encode(healed + text, "choices")

        scorer = OptionScorer.build(params, encode)
        if not use_trie(params, scorer.token_ids):
            return None, scorer
        eos = self.tokenizer.eos_token_id if self.tokenizer else None
        return ChoiceTrie(params.choices, encode, eos), None
