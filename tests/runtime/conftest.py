"""A real AsyncLLM over the shared float32 embedded model the engine tests load once."""

from __future__ import annotations

import pytest

from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from tests.llm_backend.conftest import embedded_model


def make_cpu_engine(**config) -> LLMEngine:
    config.setdefault("kv_cache_tokens", 8192)
    return LLMEngine(
        EngineConfig(device="cpu", dtype="float32", **config), model=embedded_model("cpu")
    )


@pytest.fixture
async def real_llm():
    llm = AsyncLLM(engine=make_cpu_engine())
    yield llm
    await llm.close()
