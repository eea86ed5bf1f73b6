"""`ChatServedApp`: the RAG chatbot over HTTP, keeping each caller's conversation.

The plain graph app is stateless (history is an input); served this way, a caller sends
only `question` and the `session_id` it got back from its first turn, and the server keeps
the history and its KV (`RagChatbot`). The routes stay generic: this is one more
`ServedApp`, its last event a `RunFinished` whose outputs are the answer, the sources it
cites with their text, and the session id. A session whose caller never returns costs no
KV past the idle time (`ServerSettings.session_idle_s`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from covey.apps.chat_history import MAX_SESSION_ID_CHARS
from covey.apps.citations import Citation
from covey.apps.rag_chatbot import MAX_QUESTION_CHARS, RagChatbot
from covey.errors import EngineUnavailableError
from covey.graph.app import App
from covey.retrieval.documents import SearchResult
from covey.runtime.events import Event, RunFinished
from covey.server.graph_app import check_max_tokens
from covey.server.state import ServerState

NAME = "rag_chatbot"


class ChatInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    session_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SESSION_ID_CHARS,
        description="the id a previous turn returned; omit it to start a new conversation",
    )


class ChatSource(BaseModel):
    """Passage `n` of the turn's prompt: the chunk's full text and where it comes from."""

    n: int
    text: str
    source: str
    chunk_id: str


class ChatOutputs(BaseModel):
    answer: str
    citations: list[ChatSource] = Field(
        description="the passages the answer cites; every retrieved passage if it cites none"
    )
    cited: bool = Field(description="whether the answer cited any passage")
    session_id: str


class ResetInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)


class ChatServedApp:
    """`RagChatbot` as the `ServedApp` named "rag_chatbot"."""

    input_model: type[BaseModel] = ChatInputs
    output_model: type[BaseModel] = ChatOutputs

    def __init__(self, bot: RagChatbot, name: str = NAME) -> None:
        self.bot = bot
        self.name = name
        self.description = (
            "chat about the indexed docs: takes question and session_id (omit it on the first "
            "turn); returns answer, the cited sources with their text, and session_id"
        )

    def stream(self, inputs: BaseModel) -> AsyncIterator[Event]:
        if not isinstance(inputs, ChatInputs):
            inputs = ChatInputs.model_validate(inputs.model_dump())
        session_id = inputs.session_id or uuid.uuid4().hex
        return self._turn(session_id, inputs.question)

    async def _turn(self, session_id: str, question: str) -> AsyncIterator[Event]:
        async for event in self.bot.stream(session_id, question):
            if isinstance(event, RunFinished):
                out = event.outputs
                sources = _sources(out["citations"], out["passages"])
                reply = ChatOutputs(
                    answer=out["answer"],
                    citations=sources,
                    cited=out["cited"],
                    session_id=session_id,
                )
                yield RunFinished(reply.model_dump(), event.trace)
            else:
                yield event

    async def reset(self, session_id: str) -> bool:
        """Forget the session and release its pinned KV; whether it existed."""
        return await self.bot.reset_session(session_id)

    async def close(self) -> None:
        """Release every session's pinned KV and stop the idle timers (server shutdown)."""
        await self.bot.close()

    def describe(self) -> dict[str, Any]:
        app, pins = self.bot.app, self.bot.pins
        return {
            "explain": self.bot.runtime.explain(app),
            "mermaid": app.to_mermaid(),
            "sessions": {
                "max_turns": self.bot.sessions.max_turns,
                "max_sessions": self.bot.sessions.max_sessions,
                "idle_s": pins.idle_s,
                "history_kv_pinned": pins.enabled,
            },
        }


def _sources(
    citations: tuple[Citation, ...], passages: tuple[SearchResult, ...]
) -> list[ChatSource]:
    """Each citation with its passage's full text (a citation keeps only a snippet)."""
    out = []
    for c in citations:
        chunk = passages[c.number - 1].chunk if 0 < c.number <= len(passages) else None
        text = chunk.text if chunk is not None and chunk.id == c.chunk_id else c.snippet
        out.append(ChatSource(n=c.number, text=text, source=c.source, chunk_id=c.chunk_id))
    return out


def build_served_app(state: ServerState, app: App) -> ChatServedApp:
    """What the server builder registers as "rag_chatbot": `app` (built with
    `build_rag_app`) with sessions, on the state's runtime."""
    if state.runtime is None:
        raise EngineUnavailableError("build the server's runtime before its chat app")
    check_max_tokens(app, state.settings.max_tokens)
    bot = RagChatbot(state.runtime, app, session_idle_s=state.settings.session_idle_s)
    return ChatServedApp(bot, app.name)
