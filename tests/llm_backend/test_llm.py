"""The synchronous `LLM` facade: batches in order, chat, and clear errors."""

from __future__ import annotations

import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.llm import LLM
from covey.llm_backend.sampling_params import SamplingParams
from tests.llm_backend.conftest import embedded_model_shared


@pytest.fixture(scope="module")
def llm():
    with embedded_model_shared():
        return LLM(dtype="float32", device="cpu", kv_cache_tokens=2048)


def test_generate_returns_outputs_in_input_order(llm):
    params = [
        SamplingParams(max_tokens=2, ignore_eos=True),
        SamplingParams(max_tokens=5, ignore_eos=True),
    ]
    outs = llm.generate(["Short one", "A second, longer prompt"], params)
    assert [len(o.token_ids) for o in outs] == [2, 5]
    single = llm.generate("A second, longer prompt", params[1])[0]
    assert single.token_ids == outs[1].token_ids


def test_chat_answers_through_the_template(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=12),
    )[0]
    assert "Paris" in out.text


def test_bad_calls_raise_clear_errors_and_leave_nothing_queued(llm):
    with pytest.raises(InvalidRequestError, match="at least one prompt"):
        llm.generate([])
    with pytest.raises(InvalidRequestError, match="chat messages must not be empty"):
        llm.chat([])
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        llm.generate(["fine", ""])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
