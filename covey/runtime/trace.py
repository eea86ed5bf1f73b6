"""A per-run trace: when each node ran and what its engine requests cost.

Tests and benchmarks read it to check overlap (two siblings running at once), token counts
and prefix-cache hits without reaching into the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestTrace:
    """One engine request of an LLM node (one per gen, per fan-out element).
    `choice_logprobs`: a gen with choices scored as whole options, every option ->
    log P(option | prompt) (None for other gens and for the trie).
    `ttft`: seconds from the engine taking the request to its first token (None when the
    engine did not say); `reused_tokens`: prompt tokens whose KV came from the engine's
    chunk store. Together they show what a call's prefill cost and what reuse saved it.
    """

    request_id: str
    var: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    finish_reason: str | None
    # The exact prompt text the engine got, when the run was started with record_prompts.
    prompt: str | None = None
    choice_logprobs: dict[str, float] | None = None
    ttft: float | None = None
    reused_tokens: int = 0

    @classmethod
    def of(cls, request_id: str, var: str, out: Any, **extra: Any) -> RequestTrace:
        """The record of request `request_id`'s final engine output `out` (a RequestOutput):
        its token counts, finish reason and metrics; `extra`: `prompt`, `choice_logprobs`."""
        m = out.metrics
        return cls(
            request_id,
            var,
            m.num_prompt_tokens,
            len(out.token_ids),
            m.num_cached_tokens,
            out.finish_reason,
            ttft=m.ttft,
            reused_tokens=m.num_reused_tokens,
            **extra,
        )


@dataclass(frozen=True)
class ToolCallTrace:
    """One tool call inside an LLM node: by the template (`{{call}}`) or by the model. A
    call that was never run (unknown tool, bad arguments, over the cap) has tool "?" or
    its name, and `error` says why; `result` is the text the model got back."""

    tool: str
    arguments: dict
    result: str
    error: str | None
    seconds: float
    by: str


@dataclass(frozen=True)
class SearchTrace:
    """The search a retrieve node ran: the `k` and `mode` the node gave (None: it left them
    to the searcher's own settings, which only the searcher knows) and how many results
    came back."""

    index: str
    k: int | None
    mode: str | None
    results: int


@dataclass
class NodeTrace:
    """Times are seconds since the run started (perf_counter); `end` is None while running."""

    node: str
    kind: str
    start: float
    end: float | None = None
    status: str = "running"
    error: str | None = None
    requests: list[RequestTrace] = field(default_factory=list)
    search: SearchTrace | None = None
    tool_calls: list[ToolCallTrace] = field(default_factory=list)
    # Retrieve nodes on an engine with a chunk store: chunks sent to `warm_chunks` as soon
    # as the search returned, and how many of them the engine had to load or compute.
    warmed_chunks: int = 0
    loaded_chunks: int = 0
    # What the node returned, by output name (None until it finishes; a node skipped by a
    # route or loop, status "skipped", has none): a loop's iterations `node@k` each keep theirs.
    outputs: dict[str, Any] | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(r.generated_tokens for r in self.requests)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.requests)

    @property
    def reused_tokens(self) -> int:
        return sum(r.reused_tokens for r in self.requests)

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class Trace:
    """Mutated by the executor as the run goes; read it after the run."""

    app: str
    run_id: str
    started_at: float = field(default_factory=time.perf_counter)
    end: float | None = None
    nodes: dict[str, NodeTrace] = field(default_factory=dict)
    prefills: list[RequestTrace] = field(default_factory=list)  # early and pinned prefills
    # Off by default: prompts can be long and hold users' data; switched on per run.
    record_prompts: bool = False

    def now(self) -> float:
        return time.perf_counter() - self.started_at

    def start(self, node: str, kind: str) -> NodeTrace:
        entry = NodeTrace(node, kind, self.now())
        self.nodes[node] = entry
        return entry

    def finish(self, node: str, status: str = "ok", error: str | None = None) -> None:
        entry = self.nodes[node]
        entry.end, entry.status, entry.error = self.now(), status, error

    @property
    def generated_tokens(self) -> int:
        return sum(n.generated_tokens for n in self.nodes.values())

    @property
    def cached_tokens(self) -> int:
        return sum(n.cached_tokens for n in self.nodes.values())

    @property
    def reused_tokens(self) -> int:
        """Over the nodes' requests, as the other totals: a chunk an early prefill reused
        reaches its node's request as prefix-cache hits (`cached_tokens`)."""
        return sum(n.reused_tokens for n in self.nodes.values())

    def overlapped(self, a: str, b: str) -> bool:
        """Whether nodes `a` and `b` were running at the same time."""
        x, y = self.nodes[a], self.nodes[b]
        x_end = x.end if x.end is not None else float("inf")
        y_end = y.end if y.end is not None else float("inf")
        return x.start < y_end and y.start < x_end
