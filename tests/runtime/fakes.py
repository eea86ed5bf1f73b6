"""A stand-in engine with AsyncLLM's `generate` contract that records what happened when."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from covey.llm_backend.outputs import RequestMetrics, RequestOutput
from covey.llm_backend.sampling_params import SamplingParams


class FakeTokenizer:
    """Renders chat messages as `<role>content</role>`, enough to see what was sent."""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def _metrics(n_prompt: int, n_out: int, cached: int) -> RequestMetrics:
    return RequestMetrics(None, None, None, None, n_prompt, n_out, cached, 0)


@dataclass
class FakeLLM:
    """Each request emits `reply(prompt)` split on spaces, one word per `token_delay` seconds.

    `log` records ("submit" | "finish", request_id, time); `prompts` and `priorities` what
    each request carried; `cached_tokens` is reported as the prefix-cache hit of each one.
    """

    reply: Callable[[Any], str] = lambda prompt: "alpha beta"
    token_delay: float = 0.01
    cached_tokens: int = 3
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    log: list[tuple[str, str, float]] = field(default_factory=list)
    prompts: dict[str, Any] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)
    params: dict[str, SamplingParams] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)

    async def generate(
        self, prompt: Any, params: SamplingParams, request_id: str, priority: int = 0
    ):
        self.log.append(("submit", request_id, time.perf_counter()))
        self.prompts[request_id] = prompt
        self.priorities[request_id] = priority
        self.params[request_id] = params
        words = self.reply(prompt).split(" ")[: params.max_tokens]
        text, ids = "", []
        finished = False
        try:
            for i, word in enumerate(words):
                await asyncio.sleep(self.token_delay)
                delta = word if i == 0 else " " + word
                text += delta
                ids.append(i)
                finished = i == len(words) - 1
                yield RequestOutput(
                    request_id,
                    text,
                    list(ids),
                    delta,
                    [i],
                    finished,
                    "length" if finished else None,
                    _metrics(5, len(ids), self.cached_tokens),
                )
        finally:
            if not finished:
                self.aborted.append(request_id)
            self.log.append(("finish", request_id, time.perf_counter()))

    def times(self, event: str, var: str) -> list[float]:
        """Times of `event` for requests of output variable `var` (e.g. "argue_for.argument")."""
        return [t for e, rid, t in self.log if e == event and f":{var}" in rid]
