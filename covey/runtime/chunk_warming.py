"""Retrieval-prefill pipelining: warm a retrieval's chunks the moment it returns.

Between a retrieve node and the LLM call that reads its chunks there are usually other
nodes (fusion, formatting, sibling retrievals, rewrites still decoding). An engine with a
chunk KV store (`capabilities.chunks`) can use that time to load the chunks' KV from a
lower tier into the host tier (`warm_chunks`), so the answer's prefill finds them ready.
It does not compute missing chunks standalone: that KV answers worse than the KV the
prompt's own prefill stores (see `AsyncLLM.warm_chunks`). The chunks are sent in the
canonical form every prompt uses (`chunk_segment`), so the store's keys match what the
prompt will carry.

A warm is an optimisation: it runs as a task owned by the run (cancelled with it, so a
cancelled run leaves nothing computing), and a failing warm is logged and ignored; the
prompt then computes its chunks itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from covey.llm_backend.engine_client import EngineClient
from covey.llm_backend.segments import Segment
from covey.retrieval.documents import Chunk, SearchResult
from covey.runtime.render import chunk_segment
from covey.runtime.trace import Trace

log = logging.getLogger(__name__)


class ChunkWarmer:
    """The warm tasks of one run; `start` after each retrieval, `cancel` when the run ends."""

    def __init__(self, llm: EngineClient, trace: Trace) -> None:
        self.llm = llm
        self.trace = trace
        self.enabled = llm.capabilities.chunks
        self.tasks: set[asyncio.Task[None]] = set()
        self._sent: set[str] = set()  # chunk ids this run already asked for

    def start(self, node: str, results: Any) -> None:
        """Warm the chunks among `results` that this run has not warmed yet."""
        if not self.enabled or not isinstance(results, list | tuple):
            return
        chunks: list[Segment] = []
        for item in results:
            if not isinstance(item, SearchResult | Chunk):
                continue
            seg = chunk_segment(item)
            if seg.chunk_id not in self._sent:
                self._sent.add(str(seg.chunk_id))
                chunks.append(seg)
        if chunks:
            task = asyncio.ensure_future(self._warm(node, chunks))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _warm(self, node: str, chunks: list[Segment]) -> None:
        entry = self.trace.nodes.get(node)
        try:
            loaded = await self.llm.warm_chunks(chunks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an optimisation failing must not fail the run
            log.warning(
                "warming %d chunk(s) of node %r failed (the prompt computes them): %s: %s",
                len(chunks),
                node,
                type(exc).__name__,
                exc,
            )
            return
        if entry is not None:
            entry.warmed_chunks += len(chunks)
            entry.loaded_chunks += loaded

    async def cancel(self) -> None:
        """Stop every warm still running and wait until they have stopped."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
