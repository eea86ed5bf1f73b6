from __future__ import annotations

import contextlib

import pytest
import torch

from covey.llm_backend import llm_engine
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


@contextlib.contextmanager
def embedded_model_shared():
    """Within it, an engine built by name (`LLM(...)`, a replica's own engine) over the
    embedded model in float32 on CPU takes the session's loaded copy, as `make_engine`'s
    engines do, instead of reading the weights again (seconds each). Float32 weights are
    not quantized by default; an engine asking for it anyway would change the shared copy
    in place, so within the context quantizing fails the test."""
    load, embedded = llm_engine.load_model, resolve_model(None)

    def shared(source, dtype: torch.dtype, device: torch.device):
        if source == embedded and dtype == torch.float32 and device.type == "cpu":
            return embedded_model("cpu")
        return load(source, dtype, device)

    def no_quantize(*args, **kwargs):
        raise AssertionError("embedded_model_shared: quantizing would change the shared model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_engine, "load_model", shared)
        patch.setattr(llm_engine, "quantize", no_quantize)
        yield


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
