"""Per-session conversation history for chat apps, bounded so a server's memory stays flat.

The app graph is stateless: history enters it as one `str` input. This store keeps the last
turns of each session, evicts the least recently used session past a limit, and gives each
session an `asyncio.Lock` so one session's turns run one at a time (each sees the previous
answer) while different sessions run concurrently. The history text only ever grows at its
end (until the oldest turn falls out of the window), so one turn's history is a prefix of
the next turn's and its KV can be kept and reused (`HistoryPins`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from covey.errors import ConfigError, InvalidRequestError

MAX_TURNS = 4
MAX_SESSIONS = 1024
MAX_SESSION_ID_CHARS = 128
SESSION_IDLE_S = 600.0  # a session's pinned history KV is released after this long unused
HISTORY_HEADER = "Earlier in this conversation:"


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass
class Session:
    """One conversation; `turns` keeps only the most recent `maxlen` turns. `last_used`
    (time.monotonic) is when a turn last started or ended; `pinning` is the task pinning
    the history for the next turn, which that turn waits for."""

    turns: deque[Turn]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    pinning: asyncio.Future[None] | None = None

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the session was last used; 0 while a turn runs."""
        if self.lock.locked():
            return 0.0
        return (time.monotonic() if now is None else now) - self.last_used


def format_history(turns: tuple[Turn, ...] | list[Turn]) -> str:
    """The turns as prompt text, or "" when there are none. Each turn ends in a blank line,
    so a template can put `{{history}}` straight before what follows, and adding a turn
    only appends text: the history of one turn is a prefix of the next one's."""
    if not turns:
        return ""
    parts = [HISTORY_HEADER + "\n"]
    parts += [f"User: {turn.question}\nAssistant: {turn.answer}\n\n" for turn in turns]
    return "".join(parts)


def check_session_id(session_id: str) -> None:
    if not isinstance(session_id, str) or not session_id.strip():
        raise InvalidRequestError("session_id must be a non-empty string")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequestError(
            f"session_id is {len(session_id)} characters; the limit is {MAX_SESSION_ID_CHARS}"
        )


class SessionStore:
    """Sessions by id, least recently used first.

    Methods are synchronous and never await, so on one event loop each runs atomically;
    a session evicted or reset while a turn is in flight loses that turn, as it should.
    `on_drop(session_id, session)` hears of each session reset or evicted (to release what
    it held).
    """

    def __init__(
        self,
        max_turns: int = MAX_TURNS,
        max_sessions: int = MAX_SESSIONS,
        on_drop: Callable[[str, Session], None] | None = None,
    ) -> None:
        if max_turns < 0:
            raise ConfigError(f"max_turns must be >= 0 (0 keeps no history), got {max_turns}")
        if max_sessions <= 0:
            raise ConfigError(f"max_sessions must be positive, got {max_sessions}")
        self.max_turns = max_turns
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.on_drop = on_drop

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session(self, session_id: str) -> Session:
        """The session, created if new and marked most recently used; may evict the oldest."""
        check_session_id(session_id)
        found = self._sessions.get(session_id)
        if found is None:
            found = Session(deque(maxlen=self.max_turns))
            self._sessions[session_id] = found
            while len(self._sessions) > self.max_sessions:
                self._dropped(*self._sessions.popitem(last=False))
        self._sessions.move_to_end(session_id)
        return found

    def get(self, session_id: str) -> Session | None:
        """The session if it is kept, without marking it used."""
        return self._sessions.get(session_id)

    def turns(self, session_id: str) -> tuple[Turn, ...]:
        """The kept turns, oldest first; empty for an unknown session (creates nothing)."""
        found = self._sessions.get(session_id)
        return tuple(found.turns) if found is not None else ()

    def reset(self, session_id: str) -> bool:
        """Forget the session; whether it existed."""
        found = self._sessions.pop(session_id, None)
        if found is not None:
            self._dropped(session_id, found)
        return found is not None

    def _dropped(self, session_id: str, session: Session) -> None:
        if self.on_drop is not None:
            self.on_drop(session_id, session)
