"""covey's OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions` (both
streaming and not), `GET /v1/models` and `GET /v1/models/{id}`, so the official `openai`
client, and anything built on it, works against covey's engine unchanged.

Chat messages go through the model's own chat template (`engine.tokenizer`). `n` choices
are `n` engine requests sent together, so the scheduler batches them and prefills their
shared prompt once; with a `seed`, choice i samples with seed + i, so choices differ and a
rerun repeats them. Every request takes admission slots (one per choice; a full server
answers 429 with Retry-After), `max_tokens` and `n` are bounded by the server's settings
(422 naming the field; an `n` past the admission bound too, as no retry could admit
it), and a client that goes away, streaming or not, aborts its engine requests. Failures
leave in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`),
registered with the server's error handlers for the `/v1` prefix.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from covey.errors import EngineUnavailableError, InvalidRequestError, ModelNotFoundError
from covey.llm_backend.engine_client import EngineClient
from covey.llm_backend.outputs import RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.server.errors import HttpError, http_error
from covey.server.event_stream import (
    CLIENT_GONE,
    ClientGone,
    EventStreamResponse,
    sse_frame,
    until_disconnect,
)
from covey.server.metrics import ObservedRequest
from covey.server.openai_schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from covey.server.state import ServerState

PREFIX = "/v1"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def openai_error(error: HttpError) -> dict[str, Any]:
    """OpenAI's error body; `param` is the field a validation message starts with, and
    covey's own labels ride along."""
    param = None
    if error.status == 422 and ":" in error.message:
        param = error.message.split(":", 1)[0]
    return {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status, "server_error"),
            "param": param,
            "code": error.category,
            "covey_type": error.type,
        }
    }


def _field_error(field: str, message: str) -> RequestValidationError:
    """A 422 naming `field`, like pydantic's own, for limits only the server knows."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


class _Generation:
    """One OpenAI request's engine work: the prompts, the sampling params per choice.

    It runs on the runtime's engine (`MeteredEngine`), so every engine request lands in the
    TTFT/TPOT histograms as an app's do, and the request itself is recorded through the
    same `ObservedRequest` as an app request."""

    def __init__(self, state: ServerState, body: SamplingFields, kind: str) -> None:
        _refuse_unrecognized(body)
        engine = state.require_ready()
        if state.runtime is not None:
            engine = state.runtime.llm
        self.engine: EngineClient = engine
        self.state = state
        self.kind = kind
        self.observed = ObservedRequest(state.metrics, f"{PREFIX}/{kind}")
        if body.model not in (None, engine.model_name):
            raise ModelNotFoundError(
                f"model {body.model!r} is not served here; this server serves "
                f"{engine.model_name!r} (GET /v1/models)"
            )
        settings = state.settings
        limit = body.output_limit()  # type: ignore[attr-defined]
        if limit is not None and limit > settings.max_tokens:
            newer = getattr(body, "max_completion_tokens", None)
            field = "max_completion_tokens" if newer else "max_tokens"  # the one checked
            raise _field_error(
                field, f"must be at most {settings.max_tokens} (this server's limit)"
            )
        self.n = body.n or 1
        if self.n > settings.max_fan_out:
            raise _field_error("n", f"must be at most {settings.max_fan_out} (this server's limit)")
        base = SamplingParams(
            max_tokens=limit or settings.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=body.stop or (),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
            include_stop_str_in_output=bool(body.include_stop_str_in_output),
        )
        self.params = [
            base if body.seed is None else _with_seed(base, body.seed + i) for i in range(self.n)
        ]
        self.stream = bool(body.stream)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.status = CLIENT_GONE  # what a stream is recorded with, unless it ends

    def requests(self, prompts: list[Any]) -> list[tuple[int, Any, SamplingParams]]:
        """(choice index, prompt, params) of every engine request: n per prompt."""
        return [
            (p * self.n + i, prompt, self.params[i])
            for p, prompt in enumerate(prompts)
            for i in range(self.n)
        ]

    def usage(self, finals: dict[int, RequestOutput]) -> dict[str, Any]:
        """Prompt tokens once per prompt (its n choices share it), output tokens per choice."""
        firsts = [out for index, out in finals.items() if index % self.n == 0]
        prompt = sum(o.metrics.num_prompt_tokens for o in firsts)
        cached = sum(o.metrics.num_cached_tokens for o in firsts)
        completion = sum(o.metrics.num_output_tokens for o in finals.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def _refuse_unrecognized(body: SamplingFields) -> None:
    """A 422 naming every field no parameter takes (OpenAI answers such a request 400,
    "unrecognized request argument"); see `openai_schemas`."""
    names = body.unrecognized()
    if names:
        message = "unrecognized request argument (covey's OpenAI API does not take it)"
        errors = [
            {"loc": ("body", name), "msg": message, "type": "extra_forbidden"} for name in names
        ]
        raise RequestValidationError(errors)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed % 2**64 if seed >= 2**64 else seed)


async def _pump(
    engine: EngineClient,
    rid: str,
    index: int,
    prompt: Any,
    params: SamplingParams,
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]],
) -> None:
    """Feed one engine request's outputs into the shared queue; cancelling it aborts the
    request (closing the engine stream frees its KV)."""
    try:
        async for out in engine.generate(prompt, params, request_id=f"{rid}-{index}"):
            queue.put_nowait((index, out))
    except Exception as exc:  # handed to the reader, which raises it in the request
        queue.put_nowait((index, exc))


async def _outputs(
    gen: _Generation, prompts: list[Any]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every choice's outputs as they come, interleaved; closing it early (the client
    went away) cancels the engine requests."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
    tasks = [
        asyncio.ensure_future(_pump(gen.engine, gen.id, i, prompt, params, queue))
        for i, prompt, params in gen.requests(prompts)
    ]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
                if item.finish_reason == "abort":
                    raise EngineUnavailableError(
                        f"request {item.request_id} was aborted by the server"
                    )
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _respond(
    request: Request,
    gen: _Generation,
    prompts: list[Any],
    choice: Callable[[int, RequestOutput], dict[str, Any]],
    chunk: Callable[[int, RequestOutput | None], dict[str, Any]],
    objects: tuple[str, str],
) -> Any:
    """Run the engine requests and answer: one JSON body, or an SSE stream of chunks.

    A stream's first output is awaited before the headers go out, so a request the engine
    refuses (a prompt too long) still gets its 4xx rather than an error event."""
    release = gen.state.admission.acquire(len(prompts) * gen.n)
    outputs = _outputs(gen, prompts)
    try:
        if gen.stream:
            first = await until_disconnect(request, anext(outputs))
        else:
            finals = await until_disconnect(request, _collect(outputs))
    except BaseException as exc:
        release()
        await outputs.aclose()
        gone = isinstance(exc, ClientGone) or not isinstance(exc, Exception)
        gen.observed.finish(CLIENT_GONE if gone else http_error(exc).status)
        if isinstance(exc, ClientGone):
            return Response(status_code=CLIENT_GONE)  # nobody is left to read it
        raise
    if gen.stream:

        async def on_close() -> None:  # however the response ends, even if it never began
            release()
            gen.observed.finish(gen.status)
            await outputs.aclose()

        events = _stream(gen, len(prompts), first, outputs, chunk, objects[1])
        return EventStreamResponse(events, on_close=on_close)
    release()
    gen.observed.finish(200)
    return JSONResponse(
        {
            "id": gen.id,
            "object": objects[0],
            "created": gen.created,
            "model": gen.engine.model_name,
            "choices": [choice(i, finals[i]) for i in sorted(finals)],
            "usage": gen.usage(finals),
            "system_fingerprint": None,
        }
    )


async def _collect(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    return {index: out async for index, out in outputs if out.finished}


async def _stream(
    gen: _Generation,
    num_prompts: int,
    first: tuple[int, RequestOutput],
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    chunk: Callable[[int, RequestOutput | None], dict[str, Any]],
    obj: str,
) -> AsyncIterator[str]:
    """The SSE body: each choice's opening chunk, chunks as tokens arrive, a usage chunk
    if asked, then `[DONE]`. A failure after the headers went out is an `error` event.
    A client that leaves cancels this generator; `EventStreamResponse` then closes
    `outputs` (aborting the engine requests)."""
    finals: dict[int, RequestOutput] = {}
    head = {"id": gen.id, "object": obj, "created": gen.created, "model": gen.engine.model_name}
    usage_field = {"usage": None} if gen.include_usage else {}

    async def rest() -> AsyncIterator[tuple[int, RequestOutput]]:
        yield first
        async for item in outputs:
            yield item

    try:
        for index in range(num_prompts * gen.n):
            opening = chunk(index, None)
            if opening:
                yield sse_frame({**head, "choices": [opening], **usage_field})
        async for index, out in rest():
            if out.finished:
                finals[index] = out
            if out.delta_text or out.finished:
                yield sse_frame({**head, "choices": [chunk(index, out)], **usage_field})
        if gen.include_usage:
            yield sse_frame({**head, "choices": [], "usage": gen.usage(finals)})
        gen.status = 200
        yield "data: [DONE]\n\n"
    except Exception as exc:
        error = http_error(exc)
        gen.status = error.status
        yield sse_frame(openai_error(error))
        yield "data: [DONE]\n\n"


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "covey"}


def build_router(state: ServerState) -> APIRouter:
    """The `/v1` routes over `state.engine`, and OpenAI's error shape for them."""
    state.error_shapes[PREFIX] = openai_error
    router = APIRouter(prefix=PREFIX, tags=["OpenAI-compatible"])

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        """The served model (one: the engine's)."""
        engine = state.require_ready()
        return {"object": "list", "data": [_model_card(engine.model_name)]}

    # `:path`: a model id may hold a slash (org/name), which the client sends as %2F.
    @router.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model by id (`client.models.retrieve`): the served one, else a 404."""
        engine = state.require_ready()
        if model_id != engine.model_name:
            raise ModelNotFoundError(
                f"model {model_id!r} is not served here; this server serves "
                f"{engine.model_name!r} (GET /v1/models)"
            )
        return _model_card(engine.model_name)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Chat messages, rendered with the model's chat template; `stream` for SSE."""
        gen = _Generation(state, body, "chat/completions")
        tokenizer = gen.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequestError(
                "this model has no tokenizer, so no chat template; use /v1/completions"
            )
        prompt = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages])

        def choice(index: int, out: RequestOutput) -> dict[str, Any]:
            return {
                "index": index,
                "message": {"role": "assistant", "content": out.text},
                "finish_reason": out.finish_reason,
                "logprobs": None,
            }

        def chunk(index: int, out: RequestOutput | None) -> dict[str, Any]:
            if out is None:  # each choice opens with the assistant's role
                delta: dict[str, Any] = {"role": "assistant", "content": ""}
            else:
                delta = {"content": out.delta_text} if out.delta_text else {}
            reason = out.finish_reason if out is not None and out.finished else None
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}

        objects = ("chat.completion", "chat.completion.chunk")
        return await _respond(request, gen, [prompt], choice, chunk, objects)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Plain text (or token-id) prompts completed as they are, with no chat template."""
        gen = _Generation(state, body, "completions")
        prompts = body.prompts()
        limit = state.settings.max_fan_out
        if len(prompts) * gen.n > limit:
            raise _field_error(
                "prompt", f"prompts x n must be at most {limit} (this server's limit)"
            )

        def choice(index: int, out: RequestOutput) -> dict[str, Any]:
            return {
                "index": index,
                "text": out.text,
                "finish_reason": out.finish_reason,
                "logprobs": None,
            }

        def chunk(index: int, out: RequestOutput | None) -> dict[str, Any]:
            if out is None:
                return {}  # completions have no opening chunk
            reason = out.finish_reason if out.finished else None
            text = out.delta_text
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

        objects = ("text_completion", "text_completion")
        return await _respond(request, gen, prompts, choice, chunk, objects)

    return router
