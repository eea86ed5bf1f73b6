"""Keep each chat session's conversation KV in the engine between turns, and let it go.

A chat prompt puts the conversation history before anything that changes per turn (the
retrieved passages, the question), so the prompt up to the end of the history is a true
prefix of the next turn's prompt. After a turn, that prefix, with the turn just answered
appended to the history, is prefilled and pinned under `session:<id>` while the user
reads and types; the follow-up then prefills only its passages and question. A pin is an
optimisation: the engine may refuse it or let it go when requests need the room, and an
engine without the `prefill` capability gets none. When the engine refuses one at its pin
budget, the least recently used sessions' pins make room for it, so on a busy server the
conversations in progress keep theirs while stale ones (not yet idle) lose them; but only
when releasing them can make room: when the pins that are not sessions' (the apps' static
prompts) leave too little of the budget, no session pin is given up for nothing. A pin is
released when the session is reset or evicted, or after `idle_s` without a turn, so idle
conversations hold no KV.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from covey.apps.chat_history import SESSION_IDLE_S, Session
from covey.errors import ConfigError
from covey.graph.app import App
from covey.graph.ir import llm_template
from covey.graph.lowering import known_prefix
from covey.graph.plan import NodePlan
from covey.llm_backend.block_manager import MAX_PINNED_FRACTION
from covey.llm_backend.engine_client import Prompt
from covey.llm_backend.segments import Segment
from covey.runtime.executor import Runtime
from covey.runtime.render import leading_prompt

log = logging.getLogger(__name__)

PIN_PREFIX = "session:"


def pin_key(session_id: str) -> str:
    return PIN_PREFIX + session_id


class HistoryPins:
    """The pinned history prefixes of one app's sessions on one runtime's engine.

    `held` maps a session id to the `Session` whose history its pin holds; only pins the
    engine really holds are listed (it may refuse one past its pin budget).
    """

    def __init__(
        self, runtime: Runtime, app: App, history: str = "history", idle_s: float = SESSION_IDLE_S
    ) -> None:
        if not idle_s > 0:
            raise ConfigError(f"session idle time must be positive seconds, got {idle_s}")
        self.runtime, self.idle_s = runtime, idle_s
        self.history = history
        self.node = _history_call(runtime, app, history)
        self.enabled = self.node is not None and runtime.llm.capabilities.prefill
        self.held: dict[str, Session] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def prefix(self, history: str) -> Prompt | None:
        """The prompt of the history call up to the end of its history and the static text
        after it, exactly as the call's full prompt begins; None if there is none."""
        if self.node is None or not history:
            return None
        prims = self.node.primitives
        count = known_prefix(prims, {self.history})
        template = llm_template(self.node.op)
        uses_roles = template.uses_roles if template is not None else False
        llm = self.runtime.llm
        return leading_prompt(
            prims,
            count,
            lambda p: history,
            llm.tokenizer,
            uses_roles,
            not llm.capabilities.segments,
        )

    async def pin(self, session_id: str, session: Session, history: str) -> int:
        """Pin `history`'s prefix for the session's next turn, releasing the previous pin;
        returns the tokens now pinned (0 if the engine refused or nothing was pinned)."""
        prompt = self.prefix(history) if self.enabled else None
        if prompt is None:
            return 0
        llm, key = self.runtime.llm, pin_key(session_id)
        try:
            await llm.unpin(key)  # its blocks stay cached, and the new prefix reuses them
            self.held.pop(session_id, None)
            await llm.prefill(prompt, pin=key)
            pinned = await llm.pinned()
            if key not in pinned and await self._room_by_releasing(prompt, pinned):
                while key not in pinned:
                    stale = self._least_recent(session_id)
                    if stale is None:
                        break
                    # Refused at the engine's pin budget: the session that just had a turn
                    # is the likeliest to have the next one, so the least recently used
                    # session's pin makes room (otherwise a busy server's newest sessions
                    # get no pin until old ones idle out). The prefix is cached now: this
                    # only pins it.
                    await self.release(stale)
                    await llm.prefill(prompt, pin=key)
                    pinned = await llm.pinned()
            tokens = pinned.get(key, 0)
        except Exception as exc:  # an optimisation: a failed pin only loses the speedup
            log.debug("pinning the history of session %r failed: %s", session_id, exc)
            return 0
        if tokens:
            self.held[session_id] = session
            self._arm(session_id, session)
        return tokens

    async def release(self, session_id: str, session: Session | None = None) -> bool:
        """Unpin the session's history (only if it is `session`'s, when given); whether a
        pin was released."""
        owner = self.held.get(session_id)
        if owner is None or (session is not None and owner is not session):
            return False
        del self.held[session_id]
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        try:
            return await self.runtime.llm.unpin(pin_key(session_id))
        except Exception as exc:
            log.debug("unpinning the history of session %r failed: %s", session_id, exc)
            return False

    def release_soon(self, session_id: str, session: Session) -> None:
        """Release from synchronous code (a reset, an eviction): a task on the running
        loop; without a running loop there is no engine call in flight to release."""
        if session_id not in self.held:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._track(loop.create_task(self.release(session_id, session)))

    async def release_idle(self, now: float | None = None) -> list[str]:
        """Release every pin whose session has not been used for `idle_s`."""
        idle = [s for s, owner in self.held.items() if owner.idle_for(now) >= self.idle_s]
        for session_id in idle:
            await self.release(session_id)
        return idle

    async def close(self) -> None:
        """Release every pin and stop the idle timers."""
        for session_id in list(self.held):
            await self.release(session_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _room_by_releasing(self, prompt: Prompt, pinned: dict[str, int]) -> bool:
        """Whether releasing every session's pin could let `prompt`'s pin in.

        The engine refuses a pin that would take its pins past MAX_PINNED_FRACTION of the
        pool. What no session release frees is held by the other pins (the apps' static
        prompts), taken to share no blocks as they begin different prompts; the new pin
        shares with them at most the longest one (its prompt begins with its own call's
        static text). If those and the new pin's own blocks exceed the budget, releasing
        sessions would only lose their pins."""
        stats = await self.runtime.llm.stats()
        block = stats.block_size
        tokenizer = self.runtime.llm.tokenizer
        if block <= 0 or tokenizer is None:
            return True  # nothing to reckon with: try
        budget = int(stats.kv_blocks_total * MAX_PINNED_FRACTION)
        static = [t // block for k, t in pinned.items() if not k.startswith(PIN_PREFIX)]
        needed = _token_count(prompt, tokenizer.encode) // block
        return sum(static) + needed - max(static, default=0) <= budget

    def _least_recent(self, but: str) -> str | None:
        """The held session, other than `but`, used least recently; None if there is none."""
        others = [(owner.last_used, s) for s, owner in self.held.items() if s != but]
        return min(others)[1] if others else None

    def _arm(self, session_id: str, session: Session, delay: float | None = None) -> None:
        """(Re)start the session's idle timer; when it fires the pin goes, unless the
        session was used meanwhile: then it waits out the rest of `idle_s` from that use.
        A turn that ends re-pins and re-arms it anyway, but a turn cancelled or failed
        pins nothing, and its session would otherwise hold the earlier pin for good."""
        old = self._timers.pop(session_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(session_id, None)
            if self.held.get(session_id) is not session:
                return
            left = self.idle_s - session.idle_for()
            if left > 0:  # used since (a running turn counts as use: idle_for is 0)
                self._arm(session_id, session, left)
            else:
                self._track(loop.create_task(self.release(session_id, session)))

        self._timers[session_id] = loop.call_later(
            self.idle_s if delay is None else delay, fire
        )

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _history_call(runtime: Runtime, app: App, history: str) -> NodePlan | None:
    """The LLM call whose prompt reads `history` right after static text only, so the
    prompt up to the end of the history is the same on every turn."""
    for node in runtime.plan_for(app).llm_calls():
        prims = node.primitives
        at = next((i for i, p in enumerate(prims) if p.var == history), None)
        if at is not None and all(p.op == "prefill" and p.text is not None for p in prims[:at]):
            return node
    return None


def _token_count(prompt: Prompt, encode: Any) -> int:
    """About how many tokens the engine makes of `prompt` (each segment is encoded on its
    own, as the engine does)."""
    if isinstance(prompt, str):
        return len(encode(prompt))
    if all(isinstance(s, Segment) for s in prompt):
        return sum(
            len(s.token_ids) if s.token_ids is not None else len(encode(s.text or ""))
            for s in prompt
        )
    return len(prompt)
