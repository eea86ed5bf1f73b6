"""What the engine refuses when a request is added, before anything is queued."""

from __future__ import annotations

import pytest

from covey.errors import InvalidRequestError
from covey.llm_backend.llm import LLM
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from tests.llm_backend.conftest import embedded_model_shared

VOCAB = 49152  # SmolLM2's embedding rows


@pytest.mark.parametrize(
    ("prompt", "params", "kw", "message"),
    [
        ([VOCAB], None, {}, rf"the prompt: token ids must be in \[0, {VOCAB}\), got {VOCAB}"),
        ([-3], None, {}, "the prompt: each token id must be >= 0"),
        ([Segment(token_ids=[VOCAB + 5])], None, {}, "prompt segment 0: token ids must be in"),
        (
            [Segment(text="ok"), Segment(text="bad \ud800")],
            None,
            {},
            "prompt segment 1 is not valid Unicode: surrogates not allowed at character 4",
        ),
        ("a \ud800 b", None, {}, "the prompt is not valid Unicode"),
        ("hi", SamplingParams(stop_token_ids=[VOCAB]), {}, "stop_token_ids: token ids must be in"),
        ("hi", SamplingParams(choices=["ok", "no \udfff"]), {}, "choices is not valid Unicode"),
        ("hi", {"temperature": 0.5}, {}, "params must be a SamplingParams"),
        ("hi", None, {"priority": "high"}, "priority must be an integer, got 'high'"),
        ("hi", None, {"priority": 1.5}, "priority must be an integer"),
        ("hi", None, {"request_id": 7}, "request_id must be a non-empty str, got 7"),
    ],
)
def test_bad_requests_are_refused_by_name(make_engine, prompt, params, kw, message):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, params, **kw)
    assert not engine.requests and not engine.has_unfinished_requests()


def test_bad_resume_and_prefill_are_refused_by_name(make_engine):
    engine = make_engine()
    rid = engine.add_request("A tool call follows:", SamplingParams(max_tokens=4))
    engine.step()
    engine.pause_request(rid)
    with pytest.raises(InvalidRequestError, match="the resumed request has"):
        engine.resume_request(rid, "word " * 9000)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        engine.resume_request(rid, " result", SamplingParams(stop_token_ids=[VOCAB]))
    with pytest.raises(InvalidRequestError, match="the prompt: token ids must be in"):
        engine.add_prefill([VOCAB] * 40)
    with pytest.raises(InvalidRequestError, match="priority must be an integer"):
        engine.add_prefill("x " * 40, priority=None)
    with pytest.raises(InvalidRequestError, match="pin must be a str key, got 3"):
        engine.add_prefill("x " * 40, pin=3)
    engine.run_to_completion([engine.add_prefill("x " * 40, pin="p")])
    assert "p" in engine.pinned  # a held pin skips the prefill, not the argument checks:
    with pytest.raises(InvalidRequestError, match="priority must be an integer"):
        engine.add_prefill("x " * 40, priority=None, pin="p")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_prefill("x " * 40, request_id=rid, pin="p")
    engine.abort_request(rid)


def test_chat_content_must_be_text(make_engine):
    tokenizer = make_engine().tokenizer
    with pytest.raises(InvalidRequestError, match="chat message 1: content must be a str"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "user", "content": None}]
        )
    with pytest.raises(InvalidRequestError, match="chat message 0: role must be a str"):
        tokenizer.apply_chat_template([{"role": 1, "content": "hi"}])
    with pytest.raises(
        InvalidRequestError,
        match="chat message 1: role must be one of system, user, assistant .*, got 'wizard'",
    ):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}]
        )
    # OpenAI's newer name for system is taken as system, as the HTTP route takes it.
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(developer) == tokenizer.apply_chat_template(system)
    assert developer[0]["role"] == "developer"  # the caller's messages are not changed
    with pytest.raises(InvalidRequestError, match="chat messages must be a list of dicts"):
        tokenizer.apply_chat_template("hi")


@pytest.fixture(scope="module")
def llm():
    with embedded_model_shared():
        return LLM(dtype="float32", device="cpu", kv_cache_tokens=1024)


def test_llm_generate_checks_its_lists(llm):
    with pytest.raises(InvalidRequestError, match="priority has 1 entries for 2 prompts"):
        llm.generate(["a", "b"], priority=[0])
    with pytest.raises(InvalidRequestError, match="priority must be a list of ints"):
        llm.generate(["a", "b"], priority=3)
    with pytest.raises(InvalidRequestError, match="prompt 1: the prompt is not valid Unicode"):
        llm.generate(["a", "b \ud800"])
    with pytest.raises(InvalidRequestError, match="prompts must be a str.*got NoneType"):
        llm.generate(None)
    with pytest.raises(InvalidRequestError, match="got bytes"):
        llm.generate(b"hi")
    with pytest.raises(InvalidRequestError, match="chat messages must be a list of dicts"):
        llm.chat({"role": "user", "content": "hi"})
    with pytest.raises(InvalidRequestError, match="role must be one of .*, got 'wizard'"):
        llm.chat([{"role": "wizard", "content": "hi"}])  # as the HTTP route refuses it
    assert not llm.engine.has_unfinished_requests()


def test_the_pool_check_sees_each_requests_most_kv_tokens(make_engine, monkeypatch):
    """The validator works out a request's most KV tokens once for the pool check:
    choices bound it instead of max_tokens, the context window caps it, and a resumed
    turn gets its own."""
    engine = make_engine(max_model_len=64)
    validator = engine.validator
    seen: list[int] = []
    monkeypatch.setattr(validator, "check_pool", lambda needed, what: seen.append(needed))
    prompt = engine.tokenize("Is the sky blue? Answer:")[0]
    trie = SamplingParams(choices=[" yes", " no"], choice_scoring="trie")
    choices = validator.check(prompt, trie, None, 0, ())
    most = len(prompt) + choices.choice_trie.max_tokens
    validator.check(prompt, SamplingParams(max_tokens=1000), None, 0, ())
    validator.check_resume(" more", SamplingParams(max_tokens=3), "r", 0, context=len(prompt) + 1)
    extra = len(engine.tokenize(" more")[0])
    assert seen == [most, 64, len(prompt) + 1 + extra + 3] and most < len(prompt) + 256
