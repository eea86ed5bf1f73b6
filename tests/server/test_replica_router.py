"""The cache-aware routing policy on its own: no Ray, no model."""

from __future__ import annotations

import pytest

from covey.errors import ConfigError, EngineUnavailableError, InvalidRequestError
from covey.llm_backend.segments import Segment
from covey.server.replica_router import BLOCK_CHARS, ReplicaRouter, route_key

SYSTEM_A = "You answer questions about Python's standard library. " * 8
SYSTEM_B = "You summarise documents in three short bullet points. " * 8


def rag_prompt(system: str, chunks: list[str], question: str) -> list[Segment]:
    return [
        Segment(system, kind="static"),
        *(Segment(f"passage {c}: " + c * 40, kind="chunk", chunk_id=c) for c in chunks),
        Segment(question, kind="dynamic"),
    ]


def prefilled(router: ReplicaRouter, key) -> tuple[str, str]:
    """Route `key` and let its first output come back: its prefill is queued no more."""
    name, decision = router.choose(key)
    router.first_output(name, router.last_stamp)
    return name, decision


def test_a_repeated_static_prefix_goes_back_to_the_replica_that_holds_it():
    router = ReplicaRouter(["r0", "r1", "r2"])
    first, decision = prefilled(router, route_key(rag_prompt(SYSTEM_A, ["x"], "what is os?")))
    assert decision == "balance"  # nothing matched yet: the least-loaded replica
    other, _ = prefilled(router, route_key(rag_prompt(SYSTEM_B, ["y"], "summarise it")))
    assert other != first  # both idle: ties broken by the least cache held, so it spreads
    for question in ("what is sys?", "what is re?", "and pathlib?"):
        name, decision = prefilled(router, route_key(rag_prompt(SYSTEM_A, ["z"], question)))
        assert (name, decision) == (first, "affinity")
    assert router.counters.decisions == {"balance": 2, "affinity": 3}
    assert router.counters.predicted_hit_rate > 0.5


def test_a_session_follows_its_longest_prefix():
    router = ReplicaRouter(["r0", "r1"])
    history = "user: hi\nassistant: hello, how can I help?\n" * 6
    a, _ = prefilled(router, route_key(SYSTEM_A + history))
    # The other replica has the system prompt only: the session's replica matches longer.
    router.views["r1" if a == "r0" else "r0"].remember(route_key(SYSTEM_A))
    name, decision = router.choose(route_key(SYSTEM_A + history + "user: and then?\n"))
    assert (name, decision) == (a, "affinity")


def test_chunks_held_out_of_order_count_when_the_prefix_does_not_decide():
    router = ReplicaRouter(["r0", "r1"])
    router.views["r1"].remember(route_key(rag_prompt(SYSTEM_B, ["c1", "c2"], "q")))
    router.views["r0"].remember(route_key(rag_prompt(SYSTEM_B, ["c9"], "q")))
    # Same static prefix on both; only r1 holds c1 and c2 (here after another question).
    key = route_key(rag_prompt(SYSTEM_B, ["c2", "c1"], "another question"))
    assert router.views["r1"].score(key) > router.views["r0"].score(key)
    assert router.choose(key) == ("r1", "affinity")


def test_the_best_match_is_skipped_when_its_queue_is_too_far_ahead():
    router = ReplicaRouter(["r0", "r1"], max_imbalance=2)
    key = route_key(SYSTEM_A + "question")
    home, _ = router.choose(key)
    for _ in range(3):
        router.started(home)
    name, decision = router.choose(route_key(SYSTEM_A + "question two"))
    assert name != home and decision == "fallback"
    # Now both hold the prefix: among equal matches the shorter queue wins, by affinity.
    assert router.choose(route_key(SYSTEM_A + "question three")) == (name, "affinity")


def test_a_replica_s_report_counts_as_load():
    router = ReplicaRouter(["r0", "r1"], max_imbalance=1)
    home, _ = router.choose(route_key(SYSTEM_A))
    router.report(home, queue=5, pins=["app:1"])
    assert router.choose(route_key(SYSTEM_A + "q"))[1] == "fallback"
    assert router.holder_of("app:1") == home


def test_a_pin_stays_where_it_was_taken():
    router = ReplicaRouter(["r0", "r1"])
    where, _ = router.choose(route_key(SYSTEM_A, pin="session:s1"))
    assert router.holder_of("session:s1") == where
    for _ in range(4):  # load elsewhere does not move it (a pin is one call, re-asked)
        router.started(where)
    assert router.choose(route_key(SYSTEM_A + "more", pin="session:s1")) == (where, "pin")


def test_a_dead_replica_is_forgotten_and_a_retry_avoids_it():
    router = ReplicaRouter(["r0", "r1"])
    key = route_key(SYSTEM_A)
    home, _ = router.choose(key)
    assert router.choose(key, exclude=[home])[0] != home
    router.forget(home)
    assert router.views[home].score(key) == 0 and not router.views[home].pins
    assert all(home not in holders for holders in router.index.values())
    with pytest.raises(EngineUnavailableError, match="no engine replica"):
        router.choose(key, exclude=["r0", "r1"])


def test_the_mirror_is_capped_at_the_replica_s_capacity_lru_first():
    router = ReplicaRouter(["r0"], capacity_chars=4 * BLOCK_CHARS)
    view = router.views["r0"]
    old, new = route_key("a" * 4 * BLOCK_CHARS), route_key("b" * 4 * BLOCK_CHARS)
    view.remember(old)
    view.remember(new)
    assert view.held_chars <= 4 * BLOCK_CHARS
    assert view.score(new) == 4 * BLOCK_CHARS and view.score(old) == 0
    assert old.units[0][0] not in router.index  # evicted from the inverted index too


def test_round_robin_and_pow2_ignore_the_cache():
    rr = ReplicaRouter(["r0", "r1", "r2"], policy="round_robin")
    key = route_key(SYSTEM_A)
    assert [rr.choose(key)[0] for _ in range(6)] == ["r0", "r1", "r2"] * 2
    pow2 = ReplicaRouter(["r0", "r1"], policy="pow2")
    for _ in range(3):
        pow2.started("r0")
    assert {pow2.choose(key)[0] for _ in range(10)} == {"r1"}  # both sampled: the shorter


def test_keys_of_text_token_ids_and_segments():
    text = route_key("x" * (BLOCK_CHARS * 2 + 5))
    assert [n for _, n in text.units] == [BLOCK_CHARS, BLOCK_CHARS, 5]
    assert route_key([1, 2, 3]).units == route_key([1, 2, 3]).units
    segs = route_key(rag_prompt(SYSTEM_A, ["c1"], "q"))
    assert [c for c, _, _ in segs.chunks] == ["c1"]
    # The same text with another chunk id is another chain after the static prefix.
    other = route_key(rag_prompt(SYSTEM_A, ["c2"], "q"))
    shared = len(SYSTEM_A) // BLOCK_CHARS + 1
    assert segs.units[:shared] == other.units[:shared] and segs.units[-1] != other.units[-1]
    with pytest.raises(InvalidRequestError, match="a prompt must be"):
        route_key(3.5)
    with pytest.raises(ConfigError, match="routing policy"):
        ReplicaRouter(["r0"], policy="random")


def test_a_report_asked_for_before_a_pin_was_routed_does_not_undo_it():
    router = ReplicaRouter(["r0", "r1"])
    stale = router.report_started()  # in flight while the pin is routed and prefilled
    where, _ = router.choose(route_key(SYSTEM_A, pin="session:s1"))
    router.report(where, queue=0, pins=[], seq=stale)
    assert router.holder_of("session:s1") == where
    during = router.report_started()  # asked for while the pinning prefill still runs
    router.report(where, queue=0, pins=[], seq=during)
    assert router.holder_of("session:s1") == where
    router.pin_settled(where, "session:s1")
    # Once the prefill is over, a fresh report is the truth (here: the pin is not there).
    router.report(where, queue=0, pins=[], seq=router.report_started())
    assert router.holder_of("session:s1") is None


def test_a_report_asked_for_before_an_unpin_does_not_bring_the_pin_back():
    router = ReplicaRouter(["r0", "r1"])
    where, _ = router.choose(route_key(SYSTEM_A, pin="session:s1"))
    router.pin_settled(where, "session:s1")
    stale = router.report_started()
    router.unpinned("session:s1")
    router.report(where, queue=2, pins=["session:s1"], seq=stale)
    assert router.holder_of("session:s1") is None
    assert router.views[where].reported_queue == 2  # its load still counts


def test_the_mirror_takes_the_size_of_the_replica_s_real_kv_pool():
    router = ReplicaRouter(["r0"], capacity_chars=4 * 16384)
    old, new = route_key("a" * 4 * BLOCK_CHARS), route_key("b" * 4 * BLOCK_CHARS)
    router.choose(old)
    router.choose(new)
    router.set_capacity("r0", kv_tokens=BLOCK_CHARS)  # a report: the pool holds 4 blocks
    view = router.views["r0"]
    assert view.capacity_chars == 4 * BLOCK_CHARS
    assert view.score(new) == 4 * BLOCK_CHARS and view.score(old) == 0  # LRU went first


def test_one_open_call_protects_only_what_it_brings():
    router = ReplicaRouter(["r0"])
    key_a, key_b = route_key(SYSTEM_A + "a long call"), route_key(SYSTEM_B + "a short one")
    router.choose(key_a)
    stamp_a = router.last_stamp  # a long (or paused) call stays open...
    router.choose(key_b)
    router.call_done("r0", router.last_stamp)  # ...while B is routed, runs and ends
    # The replica says it holds neither (it evicted B, and has not seen A yet).
    router.report("r0", queue=1, seq=router.report_started(), held=({}, {}))
    view = router.views["r0"]
    assert view.score(key_a) > 0  # A is in transit: kept
    assert view.score(key_b) == 0  # B is not: dropped, A's open call notwithstanding
    router.call_done("r0", stamp_a)


def test_a_report_asked_for_before_the_replica_was_forgotten_is_ignored():
    router = ReplicaRouter(["r0"])
    key = route_key(SYSTEM_A + "q")
    seq = router.report_started()  # asked for; then a call sees the replica die
    router.forget("r0")
    assert router.forgotten_since("r0", seq)
    router.report("r0", queue=3, pins=["p"], seq=seq, held=(dict(key.units), {}))
    view = router.views["r0"]  # the dead process's cache does not come back
    assert view.score(key) == 0 and view.pins == set() and view.reported_queue == 0
    fresh = router.report_started()  # a report asked for after it (the replacement) counts
    assert not router.forgotten_since("r0", fresh)
    router.report("r0", queue=0, seq=fresh, held=(dict(key.units), {}))
    assert view.score(key) > 0


# -- the cost model: estimated time to first token --------------------------------------

LONG = "You are the assistant of a long-running app; cite every passage you use. " * 36


def test_a_long_cached_prefix_on_a_busier_replica_still_wins():
    router = ReplicaRouter(["r0", "r1"])
    home, _ = prefilled(router, route_key(LONG))
    away = "r1" if home == "r0" else "r0"
    # The home replica is busier: two calls in flight, 200 prefill tokens queued, both
    # measured at 1 ms a token. Recomputing ~650 tokens elsewhere costs more than waiting.
    router.report(home, queue=2, prefill_tokens=200, profile=(0.0, 1e-3))
    router.report(away, queue=0, prefill_tokens=0, profile=(0.0, 1e-3))
    key = route_key(LONG + "question one")
    assert router.ttft_estimate(home, key) < router.ttft_estimate(away, key)
    # Seconds: the 200 queued tokens, then only the last, partial block of this prompt.
    assert 0.2 < router.ttft_estimate(home, key) < 1e-3 * (200 + (BLOCK_CHARS + 12) / 4)
    assert router.choose(key) == (home, "affinity")


def test_a_huge_queue_loses_to_an_idle_replica_that_must_recompute():
    router = ReplicaRouter(["r0", "r1"])
    home, _ = prefilled(router, route_key(LONG))
    away = "r1" if home == "r0" else "r0"
    # Still within the imbalance cap (2 calls), but 5000 prefill tokens ahead.
    router.report(home, queue=2, prefill_tokens=5000, profile=(0.0, 1e-3))
    router.report(away, queue=0, prefill_tokens=0, profile=(0.0, 1e-3))
    assert router.choose(route_key(LONG + "question two")) == (away, "fallback")


def test_each_replica_s_own_prefill_speed_counts():
    router = ReplicaRouter(["r0", "r1"])
    home, _ = prefilled(router, route_key(LONG))
    away = "r1" if home == "r0" else "r0"
    # Same queue on both; the home replica prefills ten times slower (a loaded node).
    router.report(home, queue=1, prefill_tokens=300, profile=(0.0, 1e-2))
    router.report(away, queue=1, prefill_tokens=300, profile=(0.0, 1e-3))
    assert router.choose(route_key(LONG + "question three")) == (away, "fallback")
    # At the same speed the cached prefix wins again.
    router.report(home, queue=1, prefill_tokens=300, profile=(0.0, 1e-3))
    assert router.choose(route_key(LONG + "question four")) == (home, "affinity")


def test_calls_not_streaming_yet_count_as_queued_prefill():
    router = ReplicaRouter(["r0", "r1"])
    first, _ = router.choose(route_key(LONG))
    view = router.views[first]
    assert view.queued_prefill_tokens == pytest.approx(len(LONG) / 4, abs=1)
    # A second, unrelated long prompt goes to the other replica: the first one's prefill
    # is still ahead of it here, though neither replica reported anything.
    second, decision = router.choose(route_key(LONG.upper()))
    assert second != first and decision == "balance"
    router.first_output(first, 10**6)  # no call's stamp: nothing changes
    assert view.queued_prefill_tokens > 0
    router.call_done(first, next(iter(view.open_calls)))
    assert view.queued_prefill_tokens == 0


def test_a_miss_that_would_evict_a_full_cache_costs_the_evicted_prefixes_too():
    router = ReplicaRouter(["r0", "r1"], capacity_chars=40 * BLOCK_CHARS)
    router.views["r0"].remember(route_key("z" * 40 * BLOCK_CHARS))  # r0's cache is full
    router.report("r1", queue=0, prefill_tokens=100)  # r1 has room, and a short queue
    key = route_key("y" * 20 * BLOCK_CHARS)
    assert router.choose(key) == ("r1", "balance")


def test_the_imbalance_cap_still_bounds_a_cheap_best_match():
    router = ReplicaRouter(["r0", "r1"], max_imbalance=2)
    home, _ = prefilled(router, route_key(LONG))
    # Ten calls decoding there, no prefill queued: the cost model alone would keep it.
    router.report(home, queue=10, prefill_tokens=0)
    assert router.choose(route_key(LONG + "q"))[1] == "fallback"


def test_the_reported_free_room_decides_what_a_miss_evicts():
    router = ReplicaRouter(["r0", "r1"])  # mirrors far from full: only the reports tell
    key = route_key("y" * 20 * BLOCK_CHARS)  # 640 tokens, held nowhere
    router.report("r0", queue=0, prefill_tokens=0, free_tokens=0)  # a pool full of prefixes
    router.report("r1", queue=0, prefill_tokens=300, free_tokens=4096)  # room, a queue
    assert router.choose(key) == ("r1", "balance")
    router.report("r1", queue=0, prefill_tokens=300, free_tokens=0)  # now full too
    assert router.choose(route_key("x" * 20 * BLOCK_CHARS)) == ("r0", "balance")


def test_a_first_output_after_a_report_drops_the_reported_queue():
    """Review M1: a report taken while a long prompt waited must not keep its replica
    looking busy once that prompt's first output is back."""
    router = ReplicaRouter(["r0", "r1"])
    home, _ = prefilled(router, route_key(LONG))
    for name in ("r0", "r1"):
        router.report(name, queue=0, prefill_tokens=0, profile=(0.0, 1e-3))
    name, _ = router.choose(route_key(LONG + " second question"))
    stamp = router.last_stamp
    assert name == home
    waiting = router.views[home].prefilling[stamp]
    router.report(home, queue=1, prefill_tokens=waiting + 700, seq=router.report_started())
    router.first_output(home, stamp)
    router.call_done(home, stamp)
    assert router.views[home].queued_prefill_tokens == 700  # only what the router did not send
    router.report(home, queue=0, prefill_tokens=waiting, seq=router.report_started())
    router.first_output(home, 10**6)
    # The replica's own figure still counts what the router did not send...
    assert router.views[home].queued_prefill_tokens == waiting
    router.report(home, queue=0, prefill_tokens=0, seq=router.report_started())
    assert router.views[home].queued_prefill_tokens == 0
    assert router.choose(route_key(LONG + " third question")) == (home, "affinity")


def test_a_report_in_flight_when_a_prefill_ends_does_not_bring_it_back():
    router = ReplicaRouter(["r0", "r1"])
    home, _ = prefilled(router, route_key(LONG))
    for name in ("r0", "r1"):
        router.report(name, queue=0, prefill_tokens=0, profile=(0.0, 1e-3))
    name, _ = router.choose(route_key(LONG + " again"))
    stamp = router.last_stamp
    tokens = router.views[home].prefilling[stamp] + 5000
    asked = router.report_started()  # the replica answers while the prompt still waits
    router.first_output(home, stamp)  # ...and its first output overtakes that answer
    router.report(home, queue=1, prefill_tokens=tokens, seq=asked)
    assert router.views[home].queued_prefill_tokens == 5000
    # An answer asked for even earlier, arriving last, changes nothing.
    router.report(home, queue=1, prefill_tokens=9000, seq=asked - 1)
    assert router.views[home].queued_prefill_tokens == 5000


def test_the_queued_prefill_takes_its_share_of_the_free_room_first():
    """Review L2: room a queue is about to fill is no room for this call's miss."""
    router = ReplicaRouter(["r0", "r1"])
    key = route_key("y" * 20 * BLOCK_CHARS)  # 640 tokens, held nowhere
    router.report("r0", queue=0, prefill_tokens=0, free_tokens=0)  # evicts all 640
    # Room for the miss, but 600 queued tokens take it first: 600 of the miss evict too.
    router.report("r1", queue=0, prefill_tokens=600, free_tokens=640)
    assert router.choose(key) == ("r0", "balance")


def test_a_replica_not_heard_from_yet_costs_the_others_mean_fixed_cost_too():
    """Review L1: no report yet must not make a replica cheaper by the fixed cost."""
    router = ReplicaRouter(["r0", "r1", "r2"])
    router.report("r0", queue=2, prefill_tokens=0, profile=(0.5, 1e-3))
    router.report("r1", queue=2, prefill_tokens=0, profile=(0.5, 1e-3))
    key = route_key("z" * 4 * BLOCK_CHARS)
    estimate = router.ttft_estimate("r0", key)
    router.report("r2", queue=2, prefill_tokens=0)  # as loaded, no profile measured yet
    assert router.ttft_estimate("r2", key) == pytest.approx(estimate)


# -- placement of new prefixes, and when a call leaves its cache match -----------------


def app_prompt(app: int) -> str:
    return f"You are the assistant of app {app}; cite the passage behind every claim. " * 20


def routed_to(router: ReplicaRouter, name: str, prompt: str) -> None:
    """Route `prompt` to `name` (the others excluded, as a retry would) and let it finish."""
    others = [n for n in router.views if n != name]
    assert router.choose(route_key(prompt), exclude=others)[0] == name
    router.call_done(name, router.last_stamp)


def test_a_new_prefix_goes_where_less_of_the_recent_working_set_is_despite_a_short_queue():
    """scale.py's open loop at 0.7 load: new apps went wherever the queue was shortest at
    that moment, 6 of 8 to one replica, whose cache then evicted them. A queue shorter by
    less than one call's prefill must not decide where a prefix settles."""
    router = ReplicaRouter(["r0", "r1"])
    for app in range(3):
        routed_to(router, "r0", app_prompt(app) + "question")
    routed_to(router, "r1", app_prompt(3) + "question")
    router.report("r0", queue=0, prefill_tokens=0, profile=(0.0, 1e-3))
    router.report("r1", queue=1, prefill_tokens=100, profile=(0.0, 1e-3))
    assert router.choose(route_key(app_prompt(4) + "question")) == ("r1", "balance")


def test_a_new_prefix_still_avoids_a_replica_far_costlier():
    """Far costlier by both thresholds (more than the call's prefill and over 1.5x): the
    colder replica is not worth the wait."""
    router = ReplicaRouter(["r0", "r1"])
    for app in range(3):
        routed_to(router, "r0", app_prompt(app) + "question")
    router.report("r0", queue=0, prefill_tokens=0, profile=(0.0, 1e-3))
    router.report("r1", queue=4, prefill_tokens=5000, profile=(0.0, 1e-3))
    assert router.choose(route_key(app_prompt(4) + "question")) == ("r0", "balance")


def test_the_recent_working_set_is_bounded_by_the_replicas_capacity_and_forgotten_with_one():
    router = ReplicaRouter(["r0", "r1"], capacity_chars=8 * BLOCK_CHARS)
    for app in range(6):
        router.choose(route_key(app_prompt(app)))
    hot = [v.hot_chars for v in router.views.values()]
    assert 0 < sum(hot) <= 16 * BLOCK_CHARS and all(hot)
    router.forget("r0")
    assert router.views["r0"].hot_chars == 0 and router.views["r1"].hot_chars == hot[1]


def _hot_r0_cold_r1(r0_queued: int, r1_queued: int) -> ReplicaRouter:
    """r0 holds three apps' recent routing, r1 none; per token 1 ms, no fixed cost, and
    the given prefill tokens queued on each."""
    router = ReplicaRouter(["r0", "r1"])
    for app in range(3):
        routed_to(router, "r0", app_prompt(app) + "question")
    router.report("r0", queue=1, prefill_tokens=r0_queued, profile=(0.0, 1e-3))
    router.report("r1", queue=1, prefill_tokens=r1_queued, profile=(0.0, 1e-3))
    return router


@pytest.mark.parametrize(
    ("r0_queued", "r1_queued", "why"),
    [
        (2000, 3000, "costlier by more than its prefill (~0.4 s), but only 1.4x"),
        (0, 300, "1.8x costlier, but by less than its prefill"),
    ],
)
def test_a_replica_costlier_by_only_one_threshold_is_near(r0_queued, r1_queued, why):
    """`far` needs both gaps, absolute and relative: past one only, the colder replica
    still takes the new prefix."""
    router = _hot_r0_cold_r1(r0_queued, r1_queued)
    key = route_key(app_prompt(4) + "question")
    assert router.ttft_estimate("r1", key) > router.ttft_estimate("r0", key), why
    assert router.choose(key) == ("r1", "balance"), why


def test_working_sets_within_one_call_of_each_other_count_as_level():
    """A few characters more of recent routing must not outweigh a cost gap: r0, hotter by
    one short prompt, is far cheaper than r1 (not by both thresholds), and takes the call."""
    router = ReplicaRouter(["r0", "r1"])
    routed_to(router, "r0", app_prompt(0) + "question")
    routed_to(router, "r1", app_prompt(1) + "question")
    routed_to(router, "r0", "a short one")
    router.report("r0", queue=1, prefill_tokens=0, profile=(0.0, 1e-3))
    router.report("r1", queue=1, prefill_tokens=300, profile=(0.0, 1e-3))  # near, 1.9x
    assert router.views["r0"].hot_chars > router.views["r1"].hot_chars
    assert router.choose(route_key(app_prompt(4) + "question")) == ("r0", "balance")


def _consistent(router: ReplicaRouter) -> None:
    hot = {name: v.hot_chars for name, v in router.views.items()}
    assert all(h >= 0 for h in hot.values())
    assert router._horizon == sum(v.capacity_chars for v in router.views.values())
    assert sum(hot.values()) == router._recent_chars <= router._horizon
    for name in hot:
        assert hot[name] == sum(n for (r, _), n in router._recent.items() if r == name)


def test_a_forgotten_replica_leaves_the_record_and_later_evictions_keep_it_consistent():
    router = ReplicaRouter(["r0", "r1"], capacity_chars=8 * BLOCK_CHARS)
    for app in range(6):
        router.choose(route_key(app_prompt(app)))
    router.forget("r0")
    assert not [entry for entry in router._recent if entry[0] == "r0"]
    for app in range(6, 20):
        router.choose(route_key(app_prompt(app)))
        _consistent(router)


def test_a_smaller_reported_pool_shrinks_the_horizon():
    router = ReplicaRouter(["r0", "r1"], capacity_chars=64 * BLOCK_CHARS)
    for app in range(4):
        router.choose(route_key(app_prompt(app)))
    before = router._recent_chars
    router.set_capacity("r0", 1)
    router.set_capacity("r1", 1)
    router.choose(route_key(app_prompt(5)))
    assert router._recent_chars < before
    _consistent(router)


def test_a_prefix_routed_again_stays_in_the_recent_working_set():
    """Recency, not first arrival: app 0, routed again before it would age out, outlives
    apps first routed after it."""
    router = ReplicaRouter(["r0", "r1"], capacity_chars=24 * BLOCK_CHARS)  # ~4 apps in all
    keys = [route_key(app_prompt(app)) for app in range(6)]
    for app in (0, 1, 2, 3, 0, 4, 5):
        router.choose(keys[app])
    kept = {h for _, h in router._recent}
    assert {h for h, n in keys[0].units if n > 0} <= kept
    assert {h for h, n in keys[1].units if n > 0}.isdisjoint(kept)
    _consistent(router)
