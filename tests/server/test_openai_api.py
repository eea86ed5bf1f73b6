"""The official `openai` client against covey's `/v1` on a real uvicorn server and the real
embedded model: chat, streaming chat, completions, n, seed, stop, usage, OpenAI-shaped
errors, and a client that goes away aborting its engine request."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from covey.server.state import ServerSettings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUESTION = [{"role": "user", "content": "What is a Python list?"}]


@pytest.fixture(scope="module")
def server(live_server):
    return live_server()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_lists_the_engine_model(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [server.state.engine.model_name]


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_404(server, client, model):
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("org/gpt-4o")  # a slash travels as %2F
    error = info.value.body
    assert "'org/gpt-4o'" in error["message"] and model in error["message"], error
    assert error["type"] == "not_found_error"


def test_chat_matches_a_completion_of_the_templated_prompt(server, client, model):
    """A chat is the model's chat template completed: same greedy text, same token counts."""
    chat = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0
    )
    tokenizer = server.state.engine.tokenizer
    prompt = tokenizer.apply_chat_template(QUESTION)
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    (choice,) = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content == plain.choices[0].text
    assert choice.finish_reason == plain.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(tokenizer.encode(prompt)) == plain.usage.prompt_tokens
    assert chat.usage.completion_tokens == 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")


def test_streaming_chat_streams_the_same_answer(client, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content or "" for c in middle if c.choices]
    assert len([t for t in texts if t]) > 1  # token by token, not one block
    assert "".join(texts) == whole
    assert [c.choices[0].finish_reason for c in middle if c.choices][-1] == "length"
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_choices_with_a_seed_differ_and_repeat(client, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=7)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # the seed is honoured
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert first.usage.completion_tokens == 24
    assert first.usage.prompt_tokens == again.usage.prompt_tokens  # counted once, not 3 times


def test_stop_string_ends_the_answer_before_it(client, model):
    kwargs = dict(model=model, prompt="The days of the week are Monday,", temperature=0)
    full = client.completions.create(**kwargs, max_tokens=16).choices[0].text
    words = [w for w in full.split() if len(w) > 3]
    assert words, full
    stop = words[1] if len(words) > 1 else words[0]
    cut = client.completions.create(**kwargs, max_tokens=16, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_streaming_completions(client, model):
    kwargs = dict(model=model, prompt="def add(a, b):", max_tokens=6, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": ServerSettings().max_tokens + 1}, "max_tokens"),
        ({"max_completion_tokens": ServerSettings().max_tokens + 1}, "max_completion_tokens"),
        ({"n": ServerSettings().max_batch + 1}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(client, model, kwargs, param):
    body = {"model": model, "messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(**body)
    error = info.value.body
    assert error["param"] == param, error
    assert error["message"].startswith(param) and error["type"] == "invalid_request_error"


UNSUPPORTED = {
    "reasoning_effort": "low",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
}
VLLM_ONLY = {"repetition_penalty": 1.2, "min_p": 0.1, "min_tokens": 4, "guided_json": {}}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({name: value}, name) for name, value in UNSUPPORTED.items()]
    + [({"extra_body": {name: value}}, name) for name, value in VLLM_ONLY.items()]
    + [({"extra_body": {"foo": 1}}, "foo"), ({"extra_body": {"max_token": 2}}, "max_token")],
)
def test_unrecognized_parameters_are_422_naming_them(client, model, kwargs, param):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, **kwargs)
    error = info.value.body
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}: unrecognized request argument"), error


def test_a_completion_takes_no_max_completion_tokens(client, model):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(
            model=model, prompt="x", max_tokens=2, extra_body={"max_completion_tokens": 2}
        )
    assert info.value.body["param"] == "max_completion_tokens"


def test_two_different_output_limits_are_refused(client, model):
    body = {"model": model, "messages": QUESTION, "max_tokens": 2}
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(**body, max_completion_tokens=3)
    assert info.value.body["param"] == "max_completion_tokens"
    assert "differs from max_tokens" in info.value.body["message"]
    reply = client.chat.completions.create(**body, max_completion_tokens=2)
    assert reply.usage.completion_tokens <= 2


@pytest.mark.parametrize("field", ["stream", "ignore_eos", "store"])
def test_booleans_are_strict(server, field):
    body = {"messages": QUESTION, "max_tokens": 2, field: "yes"}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == field, reply.text


def test_parameters_that_change_nothing_here_are_accepted(client, model):
    reply = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=2,
        store=False,
        metadata={"team": "docs"},
        service_tier="auto",
        parallel_tool_calls=False,
        user="u1",
        prompt_cache_key="k",
        safety_identifier="s",
        stream_options=None,
    )
    assert reply.usage.completion_tokens <= 2


def test_text_that_is_not_valid_unicode_is_a_4xx(server):
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60)
    assert 400 <= reply.status_code < 500, reply.text


def test_unknown_model_is_404_naming_the_served_one(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert "gpt-4o" in info.value.message and model in info.value.message


def test_prompt_too_long_is_400_before_the_stream_starts(client, model):
    long = "word " * 20000
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=long, max_tokens=4, stream=True)


def _engine_idle_within(server, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = server.stats()
        if not (stats.num_running or stats.num_waiting or stats.kv_blocks_used):
            return True
        time.sleep(0.05)
    return False


LONG = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}  # ~tens of seconds on CPU


def test_a_client_that_leaves_a_stream_aborts_its_request(server, model):
    body = {"model": model, "messages": QUESTION, "stream": True, **LONG}
    assert _engine_idle_within(server, 30), server.stats()  # e.g. no session pin prefilling
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if '"content":"' in line and '""' not in line)
            assert server.stats().num_running == 1
    assert _engine_idle_within(server, 5), server.stats()


async def test_a_client_that_gives_up_on_a_plain_request_aborts_it(server, model):
    body = {"model": model, "messages": QUESTION, **LONG}
    assert await asyncio.to_thread(_engine_idle_within, server, 30), server.stats()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        call = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        # It gives up mid-generation (a fixed client timeout could fire before the request
        # reached the engine, and an engine that never saw it is idle at once).
        await server.until_answering(call)
        call.cancel()  # closes its connection
        with pytest.raises(asyncio.CancelledError):
            await call
    assert await asyncio.to_thread(_engine_idle_within, server, 5), server.stats()


def test_requests_are_counted_in_metrics(server, client, model):
    client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'covey_requests_total{app="/v1/chat/completions",status="200"}' in text
