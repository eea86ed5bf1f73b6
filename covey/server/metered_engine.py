"""`MeteredEngine`: the engine as the server's runtime sees it, timing every generation.

An app run makes several engine requests (one per gen, per fan-out element) and the run's
trace keeps token counts but not when each first token came. Wrapping the engine the
runtime calls records every request's TTFT and TPOT into `ServerMetrics` as it finishes,
without the runtime or the apps knowing about metrics. Everything else passes through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from covey.llm_backend.engine_client import EngineCapabilities, EngineClient, EngineStats, Prompt
from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from covey.server.metrics import ServerMetrics


class MeteredEngine:
    def __init__(self, engine: EngineClient, metrics: ServerMetrics) -> None:
        self.inner = engine
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def capabilities(self) -> EngineCapabilities:
        return self.inner.capabilities

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        stream = self.inner.generate(prompt, params, request_id, priority)
        try:
            async for out in stream:
                if out.finished:
                    self.metrics.observe_generation(out.metrics)
                yield out
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def prefill(
        self,
        prompt: Prompt,
        priority: int = 0,
        pin: str | None = None,
        request_id: str | None = None,
    ) -> RequestOutput | None:
        return await self.inner.prefill(prompt, priority, pin, request_id)

    async def unpin(self, pin: str) -> bool:
        return await self.inner.unpin(pin)

    async def pinned(self) -> dict[str, int]:
        return await self.inner.pinned()

    async def warm_chunks(self, chunks: list[Segment]) -> int:
        return await self.inner.warm_chunks(chunks)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def pause(self, request_id: str, tool: str | None = None) -> None:
        await self.inner.pause(request_id, tool)

    async def resume(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        await self.inner.resume(request_id, extra, params)

    async def stats(self) -> EngineStats:
        return await self.inner.stats()

    async def close(self) -> None:
        await self.inner.close()
