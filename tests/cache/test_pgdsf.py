from __future__ import annotations

import pytest

from covey.cache.pgdsf import PGDSF


def drain(policy: PGDSF) -> list[tuple[str, float]]:
    """Evict everything: each victim with the clock it left behind."""
    order = []
    while (victim := policy.pop_victim()) is not None:
        order.append((victim[0], policy.clock))
    return order


def test_scripted_trace_evicts_in_hand_computed_order():
    # priority = clock + frequency * cost / size
    p = PGDSF()
    assert p.add("a", size=10, cost=10) == 1.0  # 0 + 1 * 10/10
    assert p.add("b", size=10, cost=20) == 2.0  # 0 + 1 * 20/10
    assert p.add("c", size=20, cost=10) == 0.5  # 0 + 1 * 10/20
    assert p.touch("a") == 2.0  # 0 + 2 * 1; ties b, but b was stamped earlier
    assert p.pop_victim() == ("c", 1)
    assert p.clock == 0.5  # the clock rises to the victim's priority
    assert p.add("d", size=10, cost=5) == 1.0  # 0.5 + 1 * 0.5: new but cheap goes first
    assert p.pop_victim() == ("d", 1)
    assert p.clock == 1.0
    assert p.touch("b") == 5.0  # 1 + 2 * 2
    assert p.add("e", size=10, cost=10) == 2.0  # 1 + 1 * 1: ties a (2.0), a is older
    assert drain(p) == [("a", 2.0), ("e", 2.0), ("b", 5.0)]
    assert len(p) == 0 and p.pop_victim() is None


def test_clock_ages_out_an_entry_that_stops_being_used():
    """A two-entry cache with a stream of single-use entries: LRU would drop `old` at once,
    LFU never; PGDSF keeps it a while, until the clock catches up with its priority."""
    p = PGDSF()
    p.add("old", size=1, cost=1)
    for _ in range(4):
        p.touch("old")  # frequency 5: priority 5
    evicted = []
    for i in range(20):
        p.add(f"new{i}", size=1, cost=1)  # priority clock + 1
        if len(p) > 2:
            evicted.append(p.pop_victim()[0])
    assert "old" in evicted, "the clock never caught up with a stale entry"
    assert evicted.index("old") >= 5
    assert p.clock >= 5.0


def test_skip_protects_entries_and_keeps_them_candidates():
    p = PGDSF()
    p.add("x", size=1, cost=1)
    p.add("y", size=1, cost=2)
    assert p.pop_victim(skip=lambda k: k == "x") == ("y", 1)
    assert p.pop_victim(skip=lambda k: True) is None
    assert "x" in p and p.clock == 2.0
    assert p.pop_victim() == ("x", 1)


def test_remove_is_not_an_eviction_and_many_touches_keep_order():
    p = PGDSF()
    for i, key in enumerate("abcd"):
        p.add(key, size=1, cost=float(i + 1))
    for _ in range(500):  # enough repricings to force heap compaction
        p.touch("a")
    p.remove("c")
    assert p.clock == 0.0
    assert [k for k, _ in drain(p)] == ["b", "d", "a"]


def test_bad_arguments():
    p = PGDSF()
    with pytest.raises(ValueError, match="size must be > 0 bytes, got 0"):
        p.add("a", size=0, cost=1)
    with pytest.raises(ValueError, match="frequency must be >= 1, got 0"):
        p.add("a", size=1, cost=1, frequency=0)
    with pytest.raises(ValueError, match="cost must be a finite number of seconds, got nan"):
        p.add("a", size=1, cost=float("nan"))
    assert p.add("neg", size=2, cost=-3.0) == 0.0  # a fitted profile's negative cost floors
    assert p.add("f", size=2, cost=1.0, frequency=4) == 2.0  # frequency carried over
