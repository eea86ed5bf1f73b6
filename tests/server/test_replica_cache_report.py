"""A replica's report of what its caches hold, in the router's units, read from a real
engine's prefix cache and chunk store (the embedded SmolLM2 on CPU, no Ray)."""

from __future__ import annotations

import pytest

from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from covey.server.replica_cache_report import ReplicaCacheLedger
from covey.server.replica_router import BLOCK_CHARS, ReplicaRouter, route_key
from tests.llm_backend.conftest import embedded_model

SYSTEM = "You answer questions about Python's standard library, citing the module. " * 10
OTHER = "Summarise the document below in three bullet points, plain words only. " * 10


@pytest.fixture(scope="module")
def model():
    """The embedded model in float32 on CPU that the engine tests share: loaded once per
    session (a float32 load takes seconds), engines only read it."""
    return embedded_model("cpu")


def make_engine(model, **config) -> LLMEngine:
    # One thread: on a 2-core machine shared with other jobs torch's pool of two spins.
    config = {"device": "cpu", "dtype": "float32", "num_threads": 1, **config}
    return LLMEngine(EngineConfig(**config), model=model)


def run(engine: LLMEngine, ledger: ReplicaCacheLedger, prompt) -> None:
    ticket = ledger.record(prompt)
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    ledger.finished(ticket)


def held(engine: LLMEngine, ledger: ReplicaCacheLedger):
    """As the replica reports: the ledger asks, the engine's `cache_report` answers."""
    ledger.prepare(ledger.pending())  # the replica tokenizes new prompts off the engine
    asked = ledger.questions()
    report = engine.cache_report(asked.prompts, asked.chunks)
    return ledger.answer(asked, report.cached_tokens, report.chunks_stored)


def test_it_reports_the_units_the_prefix_cache_holds_and_drops_evicted_ones(model):
    engine = make_engine(model, kv_cache_tokens=256, chunk_cache="off")
    ledger = ReplicaCacheLedger(engine.tokenizer)
    prompt = SYSTEM + "Question: what is os.path?"
    key = route_key(prompt)
    ticket = ledger.record(prompt)
    assert held(engine, ledger)[0] == dict(key.units)  # running: all of it is (to be) held
    ledger.finished(ticket)
    assert held(engine, ledger) == ({}, {})  # it never ran: nothing is cached
    assert len(ledger) == 0  # and the ledger stops checking it

    run(engine, ledger, prompt)
    units, _ = held(engine, ledger)
    # The leading units whose every token lies in a full cached block, in order.
    assert list(units) == [h for h, _ in key.units[: len(units)]]
    assert sum(units.values()) >= len(prompt) - 2 * BLOCK_CHARS
    assert key.units[-1][0] not in units  # the last partial block is never cached

    # Two more long prompts need the pool (256 tokens): the first one's blocks go.
    others = [OTHER + "Document: lists.", OTHER.replace("three", "four") + "Document: dicts."]
    for other in others:
        run(engine, ledger, other)
    units, _ = held(engine, ledger)
    assert key.units[0][0] not in units
    assert route_key(others[-1]).units[0][0] in units


def test_chunks_are_reported_while_the_chunk_store_holds_them(model):
    engine = make_engine(model, kv_cache_tokens=2048, chunk_cache="exact")
    ledger = ReplicaCacheLedger(engine.tokenizer)
    passage = "Passage: the module itertools offers chain, islice and groupby. " * 4
    prompt = [
        Segment(SYSTEM, kind="static"),
        Segment(passage, kind="chunk", chunk_id="doc-7"),
        Segment("Question: what does islice do?", kind="dynamic"),
    ]
    run(engine, ledger, prompt)
    units, chunks = held(engine, ledger)
    assert chunks == {"doc-7": len(passage)}
    assert route_key(prompt).units[0][0] in units


def test_the_router_takes_the_report_over_its_own_guess():
    router = ReplicaRouter(["r0", "r1"])
    sent = route_key(SYSTEM + "q1")
    home, _ = router.choose(sent)
    router.call_done(home, router.last_stamp)  # over: the replica's account is the truth
    asked = router.report_started()
    later = route_key(OTHER + "q2")
    assert router.choose(later)[0] != home  # routed elsewhere after the report was asked
    router.choose(route_key(OTHER + "q3"), exclude=[n for n in router.views if n != home])
    # The report says `home` evicted what it was sent, and holds a prefix routed there by
    # someone else (another front, before a restart).
    foreign = route_key("x" * 3 * BLOCK_CHARS)
    router.report(home, queue=0, seq=asked, held=(dict(foreign.units), {}))
    view = router.views[home]
    assert view.score(sent) == 0
    assert view.score(route_key(OTHER + "q3")) > 0  # routed after the report was asked
    assert router.choose(route_key("x" * 3 * BLOCK_CHARS + "more")) == (home, "affinity")
    assert view.held_chars == sum(view.prefixes.values())


def test_a_report_does_not_drop_what_a_call_still_in_transit_brings():
    router = ReplicaRouter(["r0"])
    key = route_key(SYSTEM + "q1")
    router.choose(key)
    stamp = router.last_stamp
    # The call is on its way (the replica has not recorded it): its report, asked for now,
    # cannot mention it.
    router.report("r0", queue=0, seq=router.report_started(), held=({}, {}))
    assert router.views["r0"].score(key) > 0
    router.call_done("r0", stamp)  # now the replica's account is the truth
    router.report("r0", queue=0, seq=router.report_started(), held=({}, {}))
    assert router.views["r0"].score(key) == 0


def test_a_report_does_not_refresh_what_the_prefix_cache_evicts_first(model):
    engine = make_engine(model, kv_cache_tokens=2048, chunk_cache="off")
    ledger = ReplicaCacheLedger(engine.tokenizer)
    run(engine, ledger, SYSTEM + "Question: what is os.path?")
    run(engine, ledger, OTHER + "Document: lists.")
    trie = engine.block_manager.trie
    stamps = [(n.block_id, n.last_access) for n in _nodes(trie.root)]
    units, _ = held(engine, ledger)
    assert units  # the walk found both prompts' blocks...
    assert [(n.block_id, n.last_access) for n in _nodes(trie.root)] == stamps  # ...read-only


def _nodes(node):
    for child in node.children.values():
        yield child
        yield from _nodes(child)


def test_an_overlapping_report_never_overwrites_tokens(model):
    engine = make_engine(model, kv_cache_tokens=2048, chunk_cache="off")
    ledger = ReplicaCacheLedger(engine.tokenizer)
    prompt = SYSTEM + "Question: what is os.path?"
    run(engine, ledger, prompt)
    entries = ledger.pending()
    ledger.prepare(entries)  # one report tokenized them (and let go of the text)...
    ledger.prepare(entries)  # ...an overlapping one took the same entries
    units, _ = held(engine, ledger)
    assert route_key(prompt).units[0][0] in units and len(ledger) == 1


def test_a_long_running_call_does_not_stop_the_ledger_evicting():
    ledger = ReplicaCacheLedger(None, max_prompts=8)
    ledger.record("a call that stays open (paused for a tool) " * 4)
    for i in range(8 + 10):
        ledger.finished(ledger.record(f"prompt {i} " * 20))
    assert len(ledger) <= 8 + 1


def test_reports_on_another_thread_never_break_recording():
    """As a replica reports: `questions` and then `answer` on another thread, with an await
    between them, while the loop records calls: no KeyError, and a prompt revived while
    the report ran is not dropped under it."""
    import threading
    import time

    ledger = ReplicaCacheLedger(None, max_prompts=4)  # no tokenizer: finished ones are "gone"
    stop, errors = threading.Event(), []

    def report() -> None:
        while not stop.is_set():
            try:
                asked = ledger.questions()
                time.sleep(0.0005)  # the engine answers meanwhile; calls keep being recorded
                ledger.answer(asked, [0] * len(asked.prompts), None)
            except Exception as e:  # noqa: BLE001 - the test reports any
                errors.append(e)

    thread = threading.Thread(target=report)
    thread.start()
    try:
        for i in range(3000):
            ledger.finished(ledger.record(f"prompt {i % 7} " * 20))
        ticket = ledger.record("still running " * 20)
        for _ in range(50):
            asked = ledger.questions()
            ledger.answer(asked, [0] * len(asked.prompts), None)
        assert len(ledger) >= 1  # the running one stays
    finally:
        stop.set()
        thread.join()
    ledger.finished(ticket)
    assert errors == []


def test_the_engine_reports_its_queued_prefill_and_its_prefill_profile(model):
    engine = make_engine(model, kv_cache_tokens=2048, chunk_cache="off")
    prompt = SYSTEM + "Question: what is os.path?"
    ids = engine.tokenizer.encode(prompt)
    empty = engine.cache_report([ids], [])
    assert empty.cached_tokens == (0,) and empty.chunks_stored is None
    assert empty.queued_prefill_tokens == 0
    assert empty.prefill_per_token_s > 0 and empty.prefill_fixed_s >= 0
    run(engine, ReplicaCacheLedger(engine.tokenizer), prompt)
    cached = engine.cache_report([ids], []).cached_tokens[0]
    block = engine.block_manager.block_size
    assert len(ids) - block < cached <= len(ids)  # every full block of it
    # Queued, not stepped: the same prompt again owes only its uncached tail; a new one
    # owes all of it.
    params = SamplingParams(max_tokens=1, temperature=0)
    engine.add_request(prompt, params)
    other = OTHER + "Document: sets."
    engine.add_request(other, params)
    queued = engine.cache_report([], []).queued_prefill_tokens
    assert queued == len(ids) - cached + len(engine.tokenizer.encode(other))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.cache_report([], []).queued_prefill_tokens == 0


def test_a_remote_engine_says_it_cannot_report_its_cache():
    import asyncio

    from covey.errors import NotSupportedError
    from covey.llm_backend.engine_client import CacheReporter
    from covey.llm_backend.remote_engine import RemoteEngine

    remote = RemoteEngine("http://127.0.0.1:9", tokenizer=None)  # never connected
    assert isinstance(remote, CacheReporter)
    with pytest.raises(NotSupportedError, match="cache report"):
        asyncio.run(remote.cache_report([[1, 2, 3]], []))
    asyncio.run(remote.close())
