"""What covey's own clients send is what its OpenAI routes take: `covey serve --remote` a
covey server must never meet a refused field, and the refusal of unknown fields is what the
published schema says."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from covey.llm_backend.remote_engine import _wire_params
from covey.llm_backend.sampling_params import SamplingParams
from covey.server.openai_schemas import ChatCompletionRequest, CompletionRequest


def test_every_field_the_remote_engine_sends_is_one_the_routes_take():
    params = SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        seed=2**64 - 1,
        stop=["\n", "END"],
        stop_token_ids=[2],
        ignore_eos=True,
        include_stop_str_in_output=True,
    )
    wire = _wire_params(params)
    assert {"top_k", "seed", "stop_token_ids", "include_stop_str_in_output"} <= set(wire)
    body = {"prompt": "hi", "stream": True, **wire, "model": "m"}
    body["stream_options"] = {"include_usage": True}
    assert CompletionRequest.model_validate(body).unrecognized() == []


def test_unknown_fields_are_named_and_nulls_ask_for_nothing():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    request = ChatCompletionRequest.model_validate({**body, "max_token": 5, "audio": None})
    assert request.unrecognized() == ["max_token"]


def test_a_misspelt_stream_option_is_refused():
    body = {"prompt": "hi", "stream": True, "stream_options": {"include_usgae": True}}
    with pytest.raises(ValidationError, match="include_usgae"):
        CompletionRequest.model_validate(body)


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_the_published_schema_allows_no_other_field(model):
    assert model.model_json_schema()["additionalProperties"] is False
