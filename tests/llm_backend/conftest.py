from __future__ import annotations

import pytest
import torch

from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.segments import Segment
from covey.llm_backend.weight_loader import load_model

from ..conftest import DEVICES

_models: dict[str, object] = {}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def embedded_model(device: str):
    """The embedded SmolLM2 in float32, loaded once per device for the whole session."""
    if device not in _models:
        _models[device] = load_model(resolve_model(None), torch.float32, torch.device(device))
    return _models[device]


@pytest.fixture
def make_engine(device):
    """Build engines over the shared embedded model with any pool and batching config."""

    def make(**config) -> LLMEngine:
        config.setdefault("kv_cache_tokens", 8192)
        return LLMEngine(
            EngineConfig(device=device, dtype="float32", **config), model=embedded_model(device)
        )

    return make


def numbered_chunk_prompt(order, head, docs):
    """A RAG-shaped prompt: a static head, then each named doc of `docs` in `order` as a
    chunk segment after a `[n]` label, then a question about the owl (the chunk tests'
    corpora all hold one)."""
    segments = [Segment(head, kind="static")]
    for i, name in enumerate(order):
        segments.append(Segment(f"\n[{i + 1}]", kind="static"))
        segments.append(Segment(docs[name], kind="chunk", chunk_id=name))
    segments.append(Segment("\nQuestion: who feeds the owl?\nAnswer:", kind="dynamic"))
    return segments
