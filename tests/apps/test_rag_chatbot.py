"""The chatbot on a stand-in engine (history, locking, validation) and on the real model."""

from __future__ import annotations

import asyncio

import pytest

import covey.graph as cg
from covey.apps.chat_history import Turn
from covey.apps.rag_chatbot import (
    RagChatbot,
    build_rag_app,
    open_pydocs_index,
    rag_app,
)
from covey.errors import ConfigError, InvalidRequestError
from covey.llm_backend.async_llm import AsyncLLM
from covey.llm_backend.block_manager import MAX_PINNED_FRACTION
from covey.llm_backend.engine_client import EngineCapabilities
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.runtime import Runtime
from covey.runtime.render import to_text
from tests.runtime.conftest import make_cpu_engine
from tests.runtime.fakes import FakeLLM

from .fakes import FakeRetriever, hit

APP = build_rag_app(k=3, max_tokens=24)
PREFILLS = EngineCapabilities(prefill=True, choices=True, segments=True)
RESULTS = [hit("For loops iterate.", "pydoc:for"), hit("With closes files.", "pydoc:with")]


def fake_bot(reply: str = "Use a for loop [1].", **kwargs) -> tuple[RagChatbot, FakeLLM]:
    llm = FakeLLM(reply=lambda prompt: reply, token_delay=0.005)
    runtime = Runtime(llm, retrievers={DEFAULT_INDEX_NAME: FakeRetriever(RESULTS)})
    return RagChatbot(runtime, **kwargs), llm


def prompt_of(llm: FakeLLM, answer) -> str:
    (request,) = answer.trace.nodes["answer_with_citations"].requests
    return to_text(llm.prompts[request.request_id])


async def test_a_session_sees_its_own_earlier_turns_only():
    bot, llm = fake_bot()
    first = await bot.ask("a", "How do I loop?")
    second = await bot.ask("a", "And files?")
    other = await bot.ask("b", "And files?")
    assert "Earlier in this conversation" not in prompt_of(llm, first)
    assert "User: How do I loop?\nAssistant: Use a for loop [1]." in prompt_of(llm, second)
    assert "How do I loop?" not in prompt_of(llm, other)
    assert "[1] (pydoc:for)\nFor loops iterate." in prompt_of(llm, first)
    assert [t.question for t in bot.history("a")] == ["How do I loop?", "And files?"]


async def test_turns_of_one_session_run_one_at_a_time():
    bot, llm = fake_bot()
    first, second = await asyncio.gather(bot.ask("a", "One?"), bot.ask("a", "Two?"))
    assert "User: One?" in prompt_of(llm, second)  # the lock made the second wait


async def test_sessions_run_concurrently():
    bot, llm = fake_bot()
    await asyncio.gather(bot.ask("a", "One?"), bot.ask("b", "Two?"))
    submits = [t for e, _, t in llm.log if e == "submit"]
    finishes = [t for e, _, t in llm.log if e == "finish"]
    assert max(submits) < min(finishes)


async def test_history_is_bounded_and_reset_forgets_it():
    bot, llm = fake_bot(max_turns=1)
    for q in ("One?", "Two?"):
        await bot.ask("a", q)
    third = await bot.ask("a", "Three?")
    assert "User: Two?" in prompt_of(llm, third) and "User: One?" not in prompt_of(llm, third)
    assert bot.reset("a") is True and bot.history("a") == () and bot.reset("a") is False
    fresh = await bot.ask("a", "Four?")
    assert "Earlier in this conversation" not in prompt_of(llm, fresh)


async def test_on_token_streams_the_answer_as_it_is_generated():
    bot, _ = fake_bot("Close it with a with statement [2].")
    pieces: list[str] = []
    answer = await bot.ask("a", "Files?", on_token=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == answer.answer


async def test_citations_are_parsed_or_fall_back_to_every_passage():
    bot, _ = fake_bot("Close it with a with statement [2].")
    answer = await bot.ask("a", "Files?")
    assert answer.cited and [(c.number, c.source) for c in answer.citations] == [(2, "pydoc:with")]
    assert answer.citations[0].chunk_id == RESULTS[1].chunk.id
    bot, _ = fake_bot("I do not know.")
    answer = await bot.ask("a", "Files?")
    assert not answer.cited and [c.number for c in answer.citations] == [1, 2]


async def test_bad_questions_are_refused_before_anything_runs():
    bot, llm = fake_bot(max_question_chars=10)
    with pytest.raises(InvalidRequestError, match="question is empty; ask something"):
        await bot.ask("a", "  \n")
    with pytest.raises(InvalidRequestError, match="question is 11 characters; the limit is 10"):
        await bot.ask("a", "x" * 11)
    with pytest.raises(InvalidRequestError, match="session_id must be a non-empty string"):
        await bot.ask("", "Hi?")
    assert llm.log == [] and len(bot.sessions) == 0


def test_bad_configuration_is_refused():
    runtime = Runtime(FakeLLM())

    @cg.app
    def echo(question: str):
        return {"answer": question}

    with pytest.raises(ConfigError, match="must take inputs question and history and return"):
        RagChatbot(runtime, app=echo)
    with pytest.raises(ConfigError, match="max_question_chars must be positive"):
        RagChatbot(runtime, max_question_chars=0)
    assert RagChatbot(runtime).app is rag_app


async def test_from_llm_binds_the_index_under_the_apps_name():
    retriever = FakeRetriever(RESULTS)
    bot = RagChatbot.from_llm(FakeLLM(reply=lambda p: "Loop [1]."), retriever, max_turns=2)
    answer = await bot.ask("a", "Loops?")
    assert answer.cited and retriever.queries == ["Loops?"] and bot.sessions.max_turns == 2


def test_the_default_index_is_the_python_docs(tmp_path, embedder, tokenizer):
    index = open_pydocs_index(
        tmp_path / "pydocs", limit=2, progress=False, embedder=embedder, tokenizer=tokenizer
    )
    assert len(index) > 0 and all(c.source.startswith("pydoc:") for c in index.chunks)


async def test_real_model_answers_from_the_index_and_keeps_history(real_llm, tiny_index):
    bot = RagChatbot(Runtime(real_llm, retrievers={DEFAULT_INDEX_NAME: tiny_index}), APP)
    question = "How do I loop over the items of a list?"
    first = await bot.ask("a", question)
    retrieved = tiny_index.search(question, 3, "hybrid")
    assert first.answer and first.citations
    assert "pydoc:for" in [r.chunk.source for r in retrieved]
    for c in first.citations:
        assert retrieved[c.number - 1].chunk.id == c.chunk_id
        assert c.source == retrieved[c.number - 1].chunk.source

    def prompt_tokens(answer) -> int:
        return answer.trace.nodes["answer_with_citations"].requests[0].prompt_tokens

    follow_up = "What if a dictionary key is missing?"
    second, other = await bot.ask("a", follow_up), await bot.ask("b", follow_up)
    assert second.answer and other.answer
    assert prompt_tokens(second) > prompt_tokens(other)  # the first turn is in a's prompt
    assert bot.history("a") == (Turn(question, first.answer), Turn(follow_up, second.answer))
    bot.reset("a")
    again = await bot.ask("a", follow_up)
    assert prompt_tokens(again) == prompt_tokens(other)


async def test_history_comes_first_and_stays_pinned_between_turns():
    llm = FakeLLM(reply=lambda prompt: "Use a for loop [1].", capabilities=PREFILLS)
    bot = RagChatbot(Runtime(llm, retrievers={DEFAULT_INDEX_NAME: FakeRetriever(RESULTS)}))
    first = await bot.ask("a", "How do I loop?")
    assert await bot.pinned_tokens("a") > 0
    (pinned_prompt, key), *_ = [p for p in llm.prefills if p[1] == "session:a"]
    assert "User: How do I loop?" in pinned_prompt and "For loops iterate" not in pinned_prompt
    second = await bot.ask("a", "And files?")
    prompt = prompt_of(llm, second)
    assert prompt.startswith(pinned_prompt)  # the pin is a true prefix of the next turn
    assert prompt.index("User: How do I loop?") < prompt.index("For loops iterate.")
    assert "Earlier" not in prompt_of(llm, first)
    assert await bot.reset_session("a") is True and "session:a" not in llm.pins
    await bot.ask("b", "One?")
    bot.reset("b")  # the synchronous reset releases the pin in the background
    await asyncio.sleep(0)
    assert "session:b" not in llm.pins


async def test_an_engine_without_prefill_keeps_history_but_pins_nothing():
    llm = FakeLLM(reply=lambda prompt: "Loop [1].")
    bot = RagChatbot(Runtime(llm, retrievers={DEFAULT_INDEX_NAME: FakeRetriever(RESULTS)}))
    await bot.ask("a", "One?")
    second = await bot.ask("a", "Two?")
    assert "User: One?" in prompt_of(llm, second)
    assert await bot.pinned_tokens("a") == 0 and not bot.pins.enabled and llm.pins == {}


async def test_at_the_pin_budget_the_newest_session_keeps_its_pin(tiny_index):
    """A busy server: more sessions than the engine's pin budget holds. Each session that
    just had a turn holds its pin (the least recently used ones make room, not the newest
    that is refused), and its next turn reads it."""
    llm = AsyncLLM(engine=make_cpu_engine(kv_cache_tokens=512))  # a budget of a few pins
    try:
        runtime = Runtime(llm, retrievers={DEFAULT_INDEX_NAME: tiny_index})
        bot = RagChatbot(runtime, build_rag_app(k=2, max_tokens=4))
        questions = {  # long enough that each history fills blocks of its own
            "s0": "What does a for loop do when it runs over a list of names, a tuple of "
            "numbers or the characters of a string?",
            "s1": "Why should files opened for writing be closed, and how does a with "
            "statement make sure that they always are?",
            "s2": "Which error does looking up a missing key in a dictionary raise, and how "
            "do I get a default value instead?",
            "s3": "Can a lambda expression take two arguments, and what does it return "
            "when it is called with them?",
        }
        sessions = list(questions)
        for session, question in questions.items():
            await bot.ask(session, question)
            assert await bot.pinned_tokens(session) > 0, f"{session} got no pin"
        held = [s for s in sessions if s in bot.pins.held]
        assert held == sessions[-len(held) :] and len(held) < len(sessions)  # oldest went
        budget = int(llm.engine.block_manager.num_blocks * MAX_PINNED_FRACTION)
        assert llm.engine.block_manager.num_pinned_blocks <= budget
        newest = sessions[-1]
        pinned = await bot.pinned_tokens(newest)
        follow_up = await bot.ask(newest, "And a tuple?")
        assert follow_up.trace.nodes["answer_with_citations"].cached_tokens >= pinned
        assert await bot.pinned_tokens(sessions[0]) == 0
    finally:
        await llm.close()


async def test_a_pin_outlived_by_a_cancelled_turn_still_idles_out():
    """The idle timer fires during a turn (not idle then); that turn is cancelled, so no
    new pin re-arms it: the earlier pin must still go once the session has idled."""
    llm = FakeLLM(reply=lambda prompt: "Loop " * 40, capabilities=PREFILLS, token_delay=0.02)
    bot = RagChatbot(
        Runtime(llm, retrievers={DEFAULT_INDEX_NAME: FakeRetriever(RESULTS)}),
        build_rag_app(k=2, max_tokens=40),
        session_idle_s=0.3,
    )
    await bot.ask("a", "One?")
    assert await bot.pinned_tokens("a") > 0 and "session:a" in llm.pins
    turn = asyncio.ensure_future(bot.ask("a", "Two?"))  # 40 tokens: 0.8 s
    await asyncio.sleep(0.5)  # the first pin's timer fired meanwhile, the turn running
    assert not turn.done()
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    await asyncio.sleep(0.6)  # past idle_s since the cancelled turn began, and its timer
    assert "session:a" not in llm.pins
    await bot.close()
