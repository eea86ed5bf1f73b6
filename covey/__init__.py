"""covey: a runtime for compound AI applications with its own PyTorch LLM engine.

Heavy modules (torch, transformers) load lazily, so `import covey` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "covey.llm_backend.llm",
    "AsyncLLM": "covey.llm_backend.async_llm",
    "EngineConfig": "covey.llm_backend.config",
    "SamplingParams": "covey.llm_backend.sampling_params",
    "Segment": "covey.llm_backend.segments",
}

if TYPE_CHECKING:
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm import LLM
    from covey.llm_backend.sampling_params import SamplingParams
    from covey.llm_backend.segments import Segment

__all__ = ["AsyncLLM", "EngineConfig", "LLM", "SamplingParams", "Segment", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'covey' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
