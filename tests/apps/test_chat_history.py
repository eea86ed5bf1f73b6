from __future__ import annotations

import pytest

from covey.apps.chat_history import HISTORY_HEADER, SessionStore, Turn, format_history
from covey.errors import ConfigError, InvalidRequestError


def test_history_text_is_empty_on_a_first_turn():
    assert format_history(()) == ""
    text = format_history([Turn("Hi?", "Hello.")])
    assert text == f"{HISTORY_HEADER}\nUser: Hi?\nAssistant: Hello.\n\n"


def test_only_the_last_turns_are_kept():
    store = SessionStore(max_turns=2)
    for i in range(3):
        store.session("a").turns.append(Turn(f"q{i}", f"a{i}"))
    assert [t.question for t in store.turns("a")] == ["q1", "q2"]
    assert store.turns("unknown") == () and "unknown" not in store


def test_least_recently_used_session_is_evicted():
    store = SessionStore(max_sessions=2)
    store.session("a"), store.session("b"), store.session("a"), store.session("c")
    assert "a" in store and "c" in store and "b" not in store and len(store) == 2


def test_reset_forgets_one_session():
    store = SessionStore()
    store.session("a").turns.append(Turn("q", "a"))
    store.session("b").turns.append(Turn("q", "a"))
    assert store.reset("a") is True and store.reset("a") is False
    assert store.turns("a") == () and len(store.turns("b")) == 1


def test_bad_session_ids_and_limits():
    store = SessionStore()
    with pytest.raises(InvalidRequestError, match="session_id must be a non-empty string"):
        store.session(" ")
    with pytest.raises(InvalidRequestError, match="session_id is 129 characters; the limit is 128"):
        store.session("x" * 129)
    with pytest.raises(ConfigError, match="max_turns must be >= 0"):
        SessionStore(max_turns=-1)
    with pytest.raises(ConfigError, match="max_sessions must be positive"):
        SessionStore(max_sessions=0)


def test_adding_a_turn_only_appends_to_the_history_text():
    turns = [Turn("Hi?", "Hello."), Turn("Loops?", "Use for [1]."), Turn("Files?", "with [2].")]
    texts = [format_history(turns[:n]) for n in range(1, 4)]
    assert all(longer.startswith(shorter) for shorter, longer in zip(texts, texts[1:]))


def test_dropped_sessions_are_reported():
    dropped: list[str] = []
    store = SessionStore(max_sessions=1, on_drop=lambda sid, session: dropped.append(sid))
    store.session("a"), store.session("b")
    store.reset("b"), store.reset("b")
    assert dropped == ["a", "b"] and store.get("a") is None
