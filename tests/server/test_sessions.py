"""Chat sessions over HTTP: the conversation's KV stays pinned between turns and goes away.

Against a real uvicorn server on the real model: a second turn reuses the KV of the
history the first turn left pinned (the pin holds every full block of the history's
prefix, and the second turn's cached tokens cover it, so nothing of the history is left
to prefill during the turn, however busy the shared server was before), reset and
eviction and idling release the pin, and the chat inputs are checked.
The first and second turn's time to first token are measured at the client and written
to $COVEY_TEST_ARTIFACTS/session_ttft.json when set (figures, not assertions: timings
are noisy; speed targets live in benchmarks/).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from covey.apps.chat_history import format_history
from covey.apps.history_pins import pin_key
from covey.apps.rag_chatbot import RagChatbot, build_rag_app
from covey.llm_backend.async_llm import AsyncLLM
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.runtime.executor import Runtime
from tests.runtime.conftest import make_cpu_engine

STREAM = "/apps/rag_chatbot/stream"
RESET = "/apps/rag_chatbot/reset"
ANSWER_NODE = "answer_with_citations"


def turn(client, question: str, session_id: str | None = None) -> dict[str, Any]:
    """One streamed turn: its result, plus `ttft_s` (request sent -> first token event)."""
    body: dict[str, Any] = {"question": question}
    if session_id is not None:
        body["session_id"] = session_id
    started, ttft, kind = time.perf_counter(), None, None
    with client.stream("POST", STREAM, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
                if kind == "token" and ttft is None:
                    ttft = time.perf_counter() - started
            elif line.startswith("data:") and kind in ("result", "error"):
                data = json.loads(line[5:])
                assert kind == "result", data
                return {**data, "ttft_s": ttft}
    raise AssertionError("the stream ended without a result")


def answer_node(result: dict[str, Any]) -> dict[str, Any]:
    return next(n for n in result["trace"]["nodes"] if n["node"] == ANSWER_NODE)


def pins(server) -> dict[str, int]:
    return server.call(server.state.engine.pinned())


def test_second_turn_reuses_the_kv_the_first_turn_pinned(live_server):
    server = live_server()
    bot: RagChatbot = server.state.apps["rag_chatbot"].bot
    with server.client() as client:
        turn(client, "What does the with statement do?")  # warm up: a first call is slower
        first = turn(client, "How do I write a loop over a tuple of names?")
        session = first["outputs"]["session_id"]
        pinned = server.call(bot.pinned_tokens(session))
        static = max(t for k, t in pins(server).items() if k.startswith("rag_chatbot:"))
        assert pinned > static  # the pin holds the history, not only the system prompt
        prefix = bot.pins.prefix(format_history(bot.history(session)))
        prefix_ids, _ = server.state.engine.engine.tokenize(prefix)
        block = server.state.engine.engine.config.block_size
        assert pinned == len(prefix_ids) // block * block  # every full block of the history
        second = turn(client, "And how do I catch an exception in it?", session)
    assert second["outputs"]["session_id"] == session
    one, two = answer_node(first), answer_node(second)
    # The second turn finds the whole pinned history cached. A first turn is no baseline for
    # what the pin adds: on a shared server its system prompt and retrieved passages may be
    # cached by any earlier request that retrieved the same passages (the index has five
    # documents), while the history, which comes before the passages, only the pin computed.
    assert two["cached_tokens"] >= pinned
    assert two["prompt_tokens"] > one["prompt_tokens"]  # the first turn is in its prompt
    figures = {
        "first_turn": {k: one[k] for k in ("prompt_tokens", "cached_tokens")},
        "second_turn": {k: two[k] for k in ("prompt_tokens", "cached_tokens")},
        "pinned_history_tokens": pinned,
    }
    figures["first_turn"]["ttft_s"] = round(first["ttft_s"], 4)
    figures["second_turn"]["ttft_s"] = round(second["ttft_s"], 4)
    print(f"session TTFT: {json.dumps(figures)}")
    artifacts = os.environ.get("COVEY_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / "session_ttft.json").write_text(json.dumps(figures, indent=2))


def test_reset_forgets_the_session_and_releases_its_pin(live_server):
    server = live_server()
    with server.client() as client:
        first = turn(client, "How do I look up a key in a dict?")
        session = first["outputs"]["session_id"]
        server.call(server.state.apps["rag_chatbot"].bot.pinned_tokens(session))
        assert pin_key(session) in pins(server)
        reply = client.post(RESET, json={"session_id": session})
        assert reply.status_code == 200 and reply.json() == {"session_id": session, "reset": True}
        assert pin_key(session) not in pins(server)
        assert client.post(RESET, json={"session_id": session}).json()["reset"] is False
        assert client.post(RESET, json={}).status_code == 422
        again = turn(client, "How do I look up a key in a dict?", session)
        assert answer_node(again)["prompt_tokens"] == answer_node(first)["prompt_tokens"]


def test_the_pin_does_the_history_prefill_and_idle_or_evicted_sessions_release_it(live_server):
    server = live_server()
    served = server.state.apps["rag_chatbot"]

    async def scenario() -> dict[str, Any]:
        bot = RagChatbot(server.state.runtime, served.bot.app, max_sessions=1, session_idle_s=0.5)
        engine = server.state.engine
        await bot.ask("idle-a", "What does lambda make?")
        held = await bot.pinned_tokens("idle-a")
        second = await bot.ask("idle-a", "Can it take two arguments?")
        held_two = await bot.pinned_tokens("idle-a")
        await asyncio.sleep(0.8)
        after_idle = await engine.pinned()
        await bot.ask("idle-a", "And a for loop?")  # the history survives idling
        held_again = await bot.pinned_tokens("idle-a")
        await bot.ask("idle-b", "What does finally do?")  # evicts idle-a (max_sessions=1)
        await bot.pinned_tokens("idle-b")
        await asyncio.sleep(0)  # the eviction's release runs as a task
        after_evict = await engine.pinned()
        await bot.close()
        return {
            "held": held,
            "early": [p for p in second.trace.prefills if p.var == "early"],
            "cached": second.trace.nodes[ANSWER_NODE].cached_tokens,
            "held_two": held_two,
            "after_idle": after_idle,
            "held_again": held_again,
            "history": len(bot.history("idle-a")),
            "after_evict": after_evict,
            "after_close": await engine.pinned(),
        }

    seen = server.call(scenario())
    # The second turn's history was prefilled between the turns, by the pin: the prefill
    # ahead of its answer found nothing left to compute, and the answer read the pin's KV.
    assert seen["held"] > 0 and seen["early"] == [] and seen["cached"] >= seen["held"]
    assert seen["held_two"] > seen["held"]  # two turns of history now
    assert pin_key("idle-a") not in seen["after_idle"] and seen["held_again"] > 0
    assert pin_key("idle-a") not in seen["after_evict"] and pin_key("idle-b") in seen["after_evict"]
    assert seen["history"] == 0  # evicted
    assert pin_key("idle-b") not in seen["after_close"]


def test_chat_inputs_are_checked_and_new_sessions_get_ids(live_server):
    server = live_server()
    with server.client() as client:
        for body, field in (
            ({"question": ""}, "question"),
            ({"question": 3}, "question"),
            ({"question": "Hi?", "session_id": "x" * 200}, "session_id"),
            ({"question": "Hi?", "history": "User: hi"}, "history"),
        ):
            reply = client.post(STREAM, json=body)
            assert reply.status_code == 422 and field in reply.text, (body, reply.text)
        a = turn(client, "What is a lambda?")["outputs"]["session_id"]
        b = turn(client, "What is a lambda?")["outputs"]["session_id"]
    assert a and b and a != b


async def test_no_session_gives_up_its_pin_when_that_cannot_make_room(server_index):
    """Pins that are not sessions' fill the engine's pin budget: a new session whose
    history needs more room than releasing the others could free gets no pin, and the
    others keep theirs (releasing them would lose their pins for nothing)."""
    llm = AsyncLLM(engine=make_cpu_engine(kv_cache_tokens=1024))
    try:
        runtime = Runtime(llm, retrievers={DEFAULT_INDEX_NAME: server_index})
        bot = RagChatbot(runtime, build_rag_app(k=1, max_tokens=4))
        await bot.ask("short", "What is a list?")
        assert await bot.pinned_tokens("short") > 0
        block = llm.engine.config.block_size
        for i in range(llm.engine.block_manager.num_blocks):  # one-block pins until refused
            await llm.prefill([1000 + i] * block, pin=f"filler:{i}")
            if f"filler:{i}" not in await llm.pinned():
                break
        else:
            raise AssertionError("the engine never refused a pin")
        long_question = (
            "I keep a list of the names of every file in a folder, and for each name I open "
            "the file, read its lines, count the words on each line, add them up, and then "
            "close the file again; what is the shortest way to write that loop so the files "
            "are always closed, even when reading one of them raises an error halfway?"
        )
        await bot.ask("long", long_question)
        assert await bot.pinned_tokens("long") == 0  # no room for it
        assert "short" in bot.pins.held and pin_key("short") in await llm.pinned()
        await bot.close()
    finally:
        await llm.close()
