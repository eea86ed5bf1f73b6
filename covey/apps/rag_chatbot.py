"""The default app: a chatbot that answers questions about Python from the Python docs.

Each turn retrieves passages for the question, numbers them `[n] (source)`, and asks
the model to answer from them citing `[n]`. The app graph stays stateless so the optimizer
can plan it once: `RagChatbot` keeps each session's recent turns and passes them in as the
`history` input, then maps the cited numbers back to chunks. The history comes first in
the prompt, before the passages, so each turn's prompt begins with the previous turn's
history and the session's KV for it is pinned between turns (`HistoryPins`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import covey.graph as cg
from covey.apps.chat_history import (
    MAX_SESSIONS,
    MAX_TURNS,
    SESSION_IDLE_S,
    Session,
    SessionStore,
    Turn,
    format_history,
)
from covey.apps.citations import Citation, all_citations, parse_citations, passage_segments
from covey.apps.history_pins import HistoryPins, pin_key
from covey.apps.prompt_subject import reworded
from covey.errors import ConfigError, InvalidRequestError
from covey.graph import App
from covey.llm_backend.engine_client import EngineClient
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.retrieval.documents import SearchResult
from covey.retrieval.searcher import Searcher
from covey.runtime import Event, RunFinished, Runtime, TokenDelta, drain
from covey.runtime.trace import Trace

if TYPE_CHECKING:
    from covey.retrieval.document_index import DocumentIndex

TOP_K = 4
ANSWER_MAX_TOKENS = 96
MAX_QUESTION_CHARS = 2000


def answer_with_citations(context: list[Segment], history: str, question: str):
    """{{#system}}
    You are a helpful assistant for Python programmers. Answer the question using the
    numbered passages, and cite each passage you use by its number, like [1].
    {{#user}}
    {{history}}Passages:
    {{context}}

    Question: {{question}}
    {{#assistant}}
    {{gen answer}}"""


NEUTRAL = {"a helpful assistant for Python programmers": "a helpful assistant"}
answer_neutrally = reworded(answer_with_citations, NEUTRAL)


def build_rag_app(
    index: str = DEFAULT_INDEX_NAME,
    k: int = TOP_K,
    max_tokens: int = ANSWER_MAX_TOKENS,
    mode: str = "hybrid",
    python_docs: bool = True,
) -> App:
    """The chatbot's graph: retrieve -> number the passages -> answer with citations.

    Inputs `question` and `history` (prompt text, "" on a first turn); outputs `answer` and
    `results` (the retrieved passages, in the order they were numbered). Greedy decoding.
    `python_docs=False` words the prompt without naming Python, for an index of your own.
    """
    template = answer_with_citations if python_docs else answer_neutrally
    answer_fn = cg.semantic_function(
        template, params=SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )
    passages = cg.function(passage_segments)

    @cg.app(name="rag_chatbot")
    def rag_chatbot(question: str, history: str):
        results = cg.retrieve(question, k=k, index=index, mode=mode)
        answer = answer_fn(context=passages(results), history=history, question=question)
        return {"answer": answer, "results": results}

    return rag_chatbot


rag_app = build_rag_app()


def open_pydocs_index(root: str | Path | None = None, **kwargs: Any) -> DocumentIndex:
    """The Python-docs index the default app searches, built on first use (minutes). Keyword
    arguments go to `ensure_default_index`; `limit` (a quick partial build) needs a `root`
    of your own, since the default index is always built whole."""
    from covey.retrieval.default_corpus import ensure_default_index

    return ensure_default_index(root, **kwargs)


@dataclass(frozen=True)
class ChatAnswer:
    """One turn's reply. `cited` is False when the answer cited no passage, in which case
    `citations` lists every retrieved passage instead. `passages` are the retrieved
    results in the order they were numbered (passage n is `passages[n - 1]`)."""

    session_id: str
    answer: str
    citations: tuple[Citation, ...]
    cited: bool
    trace: Trace
    passages: tuple[SearchResult, ...] = ()


class RagChatbot:
    """Multi-turn chat over an index: `await bot.ask(session, question)`.

    `runtime` must bind a retriever under the app's index name (`DEFAULT_INDEX_NAME` for
    the default app); `from_llm` does that. Turns of one session run one at a time, each seeing the
    last `max_turns` turns; sessions run concurrently. Between turns the session's history
    KV stays pinned in the engine (when it offers `prefill`); it is released on `reset`,
    when the session is evicted, or after `session_idle_s` without a turn.
    """

    def __init__(
        self,
        runtime: Runtime,
        app: App | None = None,
        max_turns: int = MAX_TURNS,
        max_sessions: int = MAX_SESSIONS,
        max_question_chars: int = MAX_QUESTION_CHARS,
        session_idle_s: float = SESSION_IDLE_S,
    ) -> None:
        app = app if app is not None else rag_app
        takes, returns = set(app.inputs), set(app.outputs)
        if takes != {"question", "history"} or not {"answer", "results"} <= returns:
            raise ConfigError(
                f"app {app.name!r} must take inputs question and history and return answer and "
                f"results (it takes {', '.join(app.inputs) or 'nothing'} and returns "
                f"{', '.join(app.outputs)}); build it with build_rag_app()"
            )
        if max_question_chars <= 0:
            raise ConfigError(f"max_question_chars must be positive, got {max_question_chars}")
        self.runtime = runtime
        self.app = app
        self.max_question_chars = max_question_chars
        self.pins = HistoryPins(runtime, app, idle_s=session_idle_s)
        self.sessions = SessionStore(max_turns, max_sessions, on_drop=self.pins.release_soon)

    @classmethod
    def from_llm(
        cls, llm: EngineClient, index: Searcher | None = None, **kwargs: Any
    ) -> RagChatbot:
        """A chatbot over `index` (default: the Python docs), served by `llm`."""
        index = index if index is not None else open_pydocs_index()
        return cls(Runtime(llm, retrievers={DEFAULT_INDEX_NAME: index}), **kwargs)

    def _check(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequestError("question is empty; ask something")
        question = question.strip()
        if len(question) > self.max_question_chars:
            raise InvalidRequestError(
                f"question is {len(question)} characters; the limit is "
                f"{self.max_question_chars} (shorten it)"
            )
        return question

    async def stream(self, session_id: str, question: str) -> AsyncIterator[Event]:
        """One turn as runtime events (node events, answer tokens), ending in a
        `RunFinished` whose outputs are the turn's `answer`, `citations`, `cited`,
        `passages` and `session_id`. Closing the stream early cancels the turn, which is
        then not recorded."""
        question = self._check(question)
        session = self.sessions.session(session_id)
        async with session.lock:
            if session.pinning is not None:  # the previous turn's pin: this turn reads it
                await asyncio.gather(session.pinning, return_exceptions=True)
            session.last_used = time.monotonic()
            history = format_history(tuple(session.turns))
            run: RunFinished | None = None
            events = self.runtime.stream(self.app, question=question, history=history)
            async with aclosing(events) as running:
                async for event in running:
                    if isinstance(event, RunFinished):
                        run = event
                    else:
                        yield event
            assert run is not None  # a run that ends without one raises instead
            answer = run.outputs["answer"].strip()
            results = tuple(run.outputs["results"])
            session.turns.append(Turn(question, answer))
            session.last_used = time.monotonic()
            if self.sessions.get(session_id) is session:  # not reset or evicted meanwhile
                next_history = format_history(tuple(session.turns))
                session.pinning = asyncio.ensure_future(
                    self._pin(session_id, session, next_history)
                )
        citations = parse_citations(answer, list(results))
        cited = bool(citations)
        if not cited:
            citations = all_citations(list(results))
        outputs = {
            "answer": answer,
            "citations": citations,
            "cited": cited,
            "passages": results,
            "session_id": session_id,
        }
        yield RunFinished(outputs, run.trace)

    async def _pin(self, session_id: str, session: Session, history: str) -> None:
        await self.pins.pin(session_id, session, history)
        if self.sessions.get(session_id) is not session:  # reset while it was pinning
            await self.pins.release(session_id, session)

    async def ask(
        self, session_id: str, question: str, on_token: Callable[[str], None] | None = None
    ) -> ChatAnswer:
        """Answer `question` in the context of the session's earlier turns, then record it.

        `on_token` receives the answer's text as it is generated (for a terminal or an SSE
        stream); the returned answer is the same text, stripped.
        """
        answer_var = self.app.outputs["answer"].name

        def relay(event: Event) -> None:
            if isinstance(event, TokenDelta) and event.var == answer_var and on_token:
                on_token(event.text)

        run = await drain(self.stream(session_id, question), relay)
        out = run.outputs
        return ChatAnswer(
            session_id, out["answer"], out["citations"], out["cited"], run.trace, out["passages"]
        )

    def history(self, session_id: str) -> tuple[Turn, ...]:
        """The turns kept for the session, oldest first."""
        return self.sessions.turns(session_id)

    def reset(self, session_id: str) -> bool:
        """Forget the session's history (its pinned KV is released in the background);
        whether there was one."""
        return self.sessions.reset(session_id)

    async def reset_session(self, session_id: str) -> bool:
        """`reset`, returning once the session's pinned KV is released."""
        session = self.sessions.get(session_id)
        existed = self.sessions.reset(session_id)
        if session is not None:
            if session.pinning is not None:
                await asyncio.gather(session.pinning, return_exceptions=True)
            await self.pins.release(session_id, session)
        return existed

    async def pinned_tokens(self, session_id: str) -> int:
        """Tokens of the session's history held pinned in the engine now (waits for a pin
        in progress); 0 when none is."""
        session = self.sessions.get(session_id)
        if session is not None and session.pinning is not None:
            await asyncio.gather(session.pinning, return_exceptions=True)
        if session_id not in self.pins.held:
            return 0
        return (await self.runtime.llm.pinned()).get(pin_key(session_id), 0)

    async def release_idle(self) -> list[str]:
        """Release the pinned KV of sessions idle for `session_idle_s` (timers do this on
        their own; this is for callers that sweep); the ids released."""
        return await self.pins.release_idle()

    async def close(self) -> None:
        """Release every session's pinned KV (the sessions' history stays)."""
        await self.pins.close()
