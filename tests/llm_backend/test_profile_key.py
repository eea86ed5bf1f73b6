"""The engine reads its weights' file identity once, at load: what it reports and how it
keys measured profiles never depends on the file staying where it was."""

from __future__ import annotations

import os
import shutil

import pytest

from covey.llm_backend import prefill_profile as pp
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.model_source import resolve_model

from .conftest import embedded_model


@pytest.fixture
def engine_on_a_copy(tmp_path, monkeypatch):
    """An engine over the embedded weights whose model file is a temporary copy."""
    monkeypatch.setenv("COVEY_HOME", str(tmp_path / "home"))
    copy = tmp_path / "model.gguf"
    shutil.copyfile(resolve_model(None).path, copy)
    config = EngineConfig(model=str(copy), dtype="float32", device="cpu", kv_cache_tokens=1024)
    return LLMEngine(config, model=embedded_model("cpu")), copy


def test_reports_never_read_the_model_file_again(engine_on_a_copy, monkeypatch):
    """One engine for both cases (building it extracts the copy's tokenizer and measures
    its prefill: seconds each): the file replaced in place under the same name, then gone;
    neither makes a report measure again or fail."""
    engine, copy = engine_on_a_copy
    before = engine.cache_report([], [])
    assert before.prefill_per_token_s > 0

    def no_measuring(*args):
        raise AssertionError("a report measured the prefill again")

    monkeypatch.setattr(pp, "measure", no_measuring)
    os.utime(copy, ns=(0, 0))  # another version of the file under the same name
    assert engine.cache_report([], []).prefill_per_token_s == before.prefill_per_token_s
    copy.unlink()
    assert engine.cache_report([], []).prefill_per_token_s == before.prefill_per_token_s
