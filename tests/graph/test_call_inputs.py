"""Call-time inputs: positional arguments in declared order, types checked with pydantic
before anything runs, and one clear `AppInputError` per mistake. No model is loaded: the
checks come before the runtime is asked for."""

from __future__ import annotations

from typing import Any

import pytest

import covey.graph as cg
import covey.runtime.background as background
from covey.errors import AppInputError, ErrorCategory, GraphError, InvalidRequestError
from covey.retrieval.documents import Chunk, SearchResult


class Ticket:
    """A user's own class, which pydantic cannot describe."""


@cg.function
def summarize(text: str, tags: list[str], limit: int, extra: Any, ticket: Ticket) -> str:
    return text


@cg.app
def triage(text: str, tags: list[str], limit: int, extra: Any, ticket: Ticket):
    return summarize(text, tags, limit, extra, ticket)


@cg.function
def count(hits: list[SearchResult]) -> int:
    return len(hits)


@cg.app
def counting(hits: list[SearchResult]):
    return count(hits)


TICKET = Ticket()


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Calls that fail validation must fail before any engine is built."""

    def refuse():
        raise AssertionError("validation should have failed before the runtime was asked for")

    monkeypatch.setattr(background, "default_runtime", refuse)


def test_positional_arguments_fill_inputs_in_declared_order_and_values_are_validated():
    values = triage.bind("printer on fire", ("hw", "urgent"), "3", {"a": 1}, ticket=TICKET)
    assert values == {
        "text": "printer on fire",
        "tags": ["hw", "urgent"],  # a tuple becomes the declared list
        "limit": 3,  # lax mode, like the server's JSON validation
        "extra": {"a": 1},
        "ticket": TICKET,
    }
    chunk = Chunk("id", "text", "doc.md", 0, 4, 1)
    hits = [SearchResult(chunk, 0.5)]
    assert counting.bind(hits)["hits"] == hits


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (42, ["hw"], 1, None, TICKET),
            {},
            r"app 'triage': input 'text' expects str, got int \(42\): Input should be a valid "
            r"string",
        ),
        (
            ("t", ["hw", 7], 1, None, TICKET),
            {},
            r"input 'tags' expects list\[str\], got list \(\['hw', 7\]\): at 1: Input should "
            r"be a valid string",
        ),
        (
            ("t", [], "many", None, TICKET),
            {},
            r"input 'limit' expects int, got str \('many'\)",
        ),
        (("t", [], 1, None, "a ticket"), {}, r"input 'ticket' expects Ticket, got str"),
        (
            ("t", [], 1, None, TICKET, "one more"),
            {},
            r"app 'triage' takes 5 input\(s\) \(text: str, tags: list\[str\], limit: int, "
            r"extra: Any, ticket: Ticket\) but 6 were given positionally",
        ),
        (
            ("t",),
            {"text": "again", "tags": [], "limit": 1, "extra": 0, "ticket": TICKET},
            r"input 'text' given twice, positionally and by keyword",
        ),
        (
            ("t", [], 1, None, TICKET),
            {"limt": 2},
            r"unknown input 'limt'; did you mean 'limit'\?",
        ),
        (
            ("t", [], 1, None, TICKET),
            {"record_prompts": True},
            r"record_prompts= is an option of app.run_traced\(\) and app.stream\(\)",
        ),
        (("t",), {"limit": 1}, r"missing input\(s\) 'tags', 'extra', 'ticket'"),
    ],
)
def test_each_mistake_is_one_clear_error_before_anything_runs(args, kwargs, message):
    with pytest.raises(AppInputError, match=message) as info:
        triage(*args, **kwargs)
    error = info.value
    assert isinstance(error, InvalidRequestError) and isinstance(error, TypeError)
    assert error.category is ErrorCategory.INVALID
    assert "\n" not in str(error)


async def test_awaited_and_streamed_calls_are_checked_the_same_way():
    with pytest.raises(AppInputError, match="input 'text' expects str, got int"):
        await triage.acall(42, [], 1, None, TICKET)
    with pytest.raises(AppInputError, match="input 'text' expects str, got int"):
        triage.stream(42, [], 1, None, TICKET)
    with pytest.raises(AppInputError, match="input 'hits' expects list\\[SearchResult\\]"):
        counting.run_traced(hits=["not a result"])


def test_a_long_value_is_shortened_in_the_message():
    with pytest.raises(AppInputError, match=r"got list \(\['xxxxxxxx.*\.\.\.\)") as info:
        counting(["x" * 500])
    assert len(str(info.value)) < 300


def test_an_input_named_like_a_run_option_is_refused_when_the_app_is_defined():
    def wiring(record_prompts: str):
        return summarize(record_prompts, [], 1, None, TICKET)

    with pytest.raises(GraphError, match="input name 'record_prompts' is reserved"):
        cg.app(wiring)


def test_an_input_left_out_takes_the_wiring_function_s_default():
    @cg.app
    def tagged(text: str, tags: list[str] = ["general"], limit: int = 3):  # noqa: B006
        return summarize(text, tags, limit, None, TICKET)

    assert tagged.bind("t") == {"text": "t", "tags": ["general"], "limit": 3}
    assert tagged.bind("t", limit="5")["limit"] == 5
    with pytest.raises(AppInputError, match=r"missing input\(s\) 'text'"):
        tagged(limit=1)


def test_a_default_that_does_not_fit_its_type_is_refused_when_the_app_is_defined():
    def wiring(text: str, note: str = None):  # noqa: RUF013
        return summarize(text, [], 1, note, TICKET)

    message = (
        r"app 'wiring': the default of input 'note' is None, which is not a str; "
        r"annotate it Optional\[...\] or change the default"
    )
    with pytest.raises(GraphError, match=message):
        cg.app(wiring)
