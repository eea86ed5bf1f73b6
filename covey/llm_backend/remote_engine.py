"""`RemoteEngine`: an `EngineClient` over any OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, another covey), so apps can run against a model that lives elsewhere.

Only streaming generation crosses the wire: a text prompt streams `POST /v1/completions`.
What needs the engine's KV cache (prefill ahead, pins, pause/resume, chunk reuse,
constrained choices) is not in the OpenAI API, so every capability flag is False and those
calls raise `NotSupportedError`; the runtime then renders prompts as plain text and skips
prefill ahead, and `Runtime.explain(app)` lists what is off.

The tokenizer: the API has no chat template, and apps whose templates use chat roles need
the model's own one. When the remote model's id names a model covey can load locally (the
embedded SmolLM2, a .gguf path, a Hugging Face folder), its tokenizer is loaded here
(`tokenizer="auto"`); pass one explicitly (a `ChatTokenizer`, or a model path for
`load_tokenizer`), or None to go without: role templates then fail with a clear error.

Output token ids are not in the API either: `RequestOutput.token_ids` is empty, and token
counts come from the server's `usage` (prompt, completion and, where the server reports
them in `prompt_tokens_details.cached_tokens`, prefix-cache hits).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from covey.errors import (
    ConfigError,
    CoveyError,
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    NotSupportedError,
    RequestNotFoundError,
)
from covey.llm_backend.engine_client import (
    CacheReport,
    ChatTokenizer,
    EngineCapabilities,
    EngineStats,
    Prompt,
)
from covey.llm_backend.outputs import RequestMetrics, RequestOutput
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment

_ids = itertools.count()


class RemoteAuthError(ConfigError):
    """The remote server refused the API key (401/403). `refused` is its answer alone, for a
    caller that names the key its own way (covey serve says --remote-api-key)."""

    def __init__(self, refused: str) -> None:
        super().__init__(refused + " (check the api_key)")
        self.refused = refused


def check_base_url(url: object, option: str = "base_url", example: str = "") -> None:
    """`url` is an http(s) URL, as RemoteEngine needs; ConfigError naming `option` (the CLI
    passes "--remote" and an example) otherwise."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        such = f" such as {example}" if example else ""
        raise ConfigError(f"{option} must be an http(s) URL{such}, got {url!r}")


class RemoteEngine:
    """An OpenAI-compatible server as an `EngineClient`.

    `base_url` is the server's root or its `/v1` (both work); `model` the id to ask for
    (None: the first one `GET /v1/models` lists, fetched by `connect()` or the first
    request); `api_key` is sent as a bearer token. Parameters outside the OpenAI API
    (`top_k`, `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`) are sent only
    when set, as vLLM and covey accept them.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        tokenizer: ChatTokenizer | str | Path | None = "auto",
        timeout_s: float = 600.0,
    ) -> None:
        check_base_url(base_url)
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._model = model
        self._tokenizer_spec = tokenizer
        self._tokenizer: ChatTokenizer | None = None
        self._tokenizer_resolved = False
        self._streams: dict[str, _Stream] = {}
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._closed = False

    # -- what the engine is -------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model or f"(not yet known: {self.base_url})"

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities()

    @property
    def tokenizer(self) -> ChatTokenizer | None:
        if not self._tokenizer_resolved and (
            self._model is not None or self._tokenizer_spec not in ("auto", None)
        ):
            self._tokenizer = _resolve_tokenizer(self._tokenizer_spec, self._model)
            self._tokenizer_resolved = True
        return self._tokenizer

    async def connect(self) -> RemoteEngine:
        """Check the server answers and learn the model id (the first listed when none was
        given); returns self, so `engine = await RemoteEngine(url).connect()`."""
        listed = [m.get("id") for m in (await self._get_json("/models")).get("data", [])]
        if self._model is None:
            if not listed:
                raise EngineUnavailableError(f"{self.base_url}/models lists no model")
            self._model = str(listed[0])
        return self

    async def models(self) -> list[str]:
        """The model ids the server lists."""
        return [str(m.get("id")) for m in (await self._get_json("/models")).get("data", [])]

    # -- generation ---------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream `POST /v1/completions`; `priority` is not part of the API and is not sent.
        Closing the iterator (or `abort`) closes the connection, which a serving engine
        takes as an abort."""
        if self._closed:
            raise EngineUnavailableError("this RemoteEngine is closed")
        params = params or SamplingParams()
        if params.choices:
            raise NotSupportedError(
                f"a remote engine ({self.base_url}) cannot constrain outputs to choices"
            )
        body = {"prompt": _wire_prompt(prompt), "stream": True, **_wire_params(params)}
        body["stream_options"] = {"include_usage": True}
        if self._model is None:
            await self.connect()
        body["model"] = self._model
        rid = request_id or f"remote-{next(_ids)}"
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already running")
        stream = _Stream(rid)
        self._streams[rid] = stream
        try:
            async for out in stream.run(self._http, body):
                yield out
            self._prompt_tokens += stream.prompt_tokens
            self._cached_tokens += stream.cached_tokens
        finally:
            self._streams.pop(rid, None)
            await stream.close()

    async def abort(self, request_id: str) -> None:
        """Close the request's connection; its stream ends with a finished output, reason
        "abort"."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise RequestNotFoundError(f"no running request {request_id!r}")
        stream.aborted = True
        await stream.close()

    async def stats(self) -> EngineStats:
        """What this client can observe: its own requests in flight and the prefix-cache
        hits the server reported in `usage`. The server's KV pool and queue are not in the
        API, so the block counts are 0."""
        return EngineStats(
            model=self.model_name,
            block_size=0,
            kv_blocks_total=0,
            kv_blocks_used=0,
            kv_blocks_cached=0,
            kv_blocks_pinned=0,
            prefix_cache_queried_tokens=self._prompt_tokens,
            prefix_cache_hit_tokens=self._cached_tokens,
            num_waiting=0,
            num_running=len(self._streams),
            num_paused=0,
        )

    async def close(self) -> None:
        self._closed = True
        for rid in list(self._streams):
            await self.abort(rid)
        await self._http.aclose()

    async def __aenter__(self) -> RemoteEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what needs the engine's KV cache -------------------------------------------------

    def _unsupported(self, what: str) -> NotSupportedError:
        return NotSupportedError(
            f"{what} needs access to the engine's KV cache, which a remote engine "
            f"({self.base_url}, OpenAI API) does not give"
        )

    async def prefill(
        self,
        prompt: Prompt,
        priority: int = 0,
        pin: str | None = None,
        request_id: str | None = None,
    ) -> RequestOutput | None:
        raise self._unsupported("prefill (and pinning a prefix)")

    async def unpin(self, pin: str) -> bool:
        return False  # nothing can be pinned

    async def pinned(self) -> dict[str, int]:
        return {}

    async def warm_chunks(self, chunks: list[Segment], compute: bool = False) -> int:
        raise self._unsupported("warming chunks' KV")

    async def cache_report(self, prompts: list[list[int]], chunks: list[list[int]]) -> CacheReport:
        raise self._unsupported("a cache report (what its prefix cache holds)")

    async def pause(self, request_id: str, tool: str | None = None) -> None:
        raise self._unsupported("pausing a request")

    async def resume(
        self, request_id: str, extra: Prompt, params: SamplingParams | None = None
    ) -> None:
        raise self._unsupported("resuming a paused request")

    # -- plumbing -----------------------------------------------------------------------

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = await self._http.get(path)
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"cannot reach {self.base_url}{path}: {exc}") from exc
        if response.status_code >= 400:
            raise _http_error(response.status_code, response.text, f"GET {path}")
        return response.json()


class _Stream:
    """One streamed completion: its connection, what the server reported, its metrics."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.aborted = False
        self.response: httpx.Response | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0

    async def close(self) -> None:
        if self.response is not None:
            await self.response.aclose()

    async def run(self, http: httpx.AsyncClient, body: dict[str, Any]):
        start = time.perf_counter()
        first: float | None = None
        text, reason, usage, chunks = "", None, None, 0
        try:
            request = http.build_request("POST", "/completions", json=body)
            self.response = await http.send(request, stream=True)
            if self.response.status_code >= 400:
                await self.response.aread()
                raise _http_error(self.response.status_code, self.response.text, self.rid)
            async for data in _sse_data(self.response):
                if self.aborted:  # events already read before the connection closed
                    break
                if "error" in data:  # a failure after the stream began: its type says whose
                    status = _event_status(data["error"])
                    raise _http_error(status, json.dumps(data), self.rid)
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices") or []:
                    delta = choice.get("text") or ""
                    reason = choice.get("finish_reason") or reason
                    if not delta:
                        continue
                    first = first or time.perf_counter()
                    text += delta
                    chunks += 1
                    yield self._output(text, delta, False, None, start, first, usage, chunks)
        except (httpx.HTTPError, asyncio.CancelledError) as exc:
            if not self.aborted:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise EngineUnavailableError(f"request {self.rid!r}: {exc}") from exc
        if self.aborted:
            reason = "abort"
        elif reason is None:
            raise EngineError(f"request {self.rid!r}: the server ended the stream unfinished")
        yield self._output(text, "", True, reason, start, first, usage, chunks)

    def _output(self, text, delta, finished, reason, start, first, usage, chunks):
        now = time.perf_counter()
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        n_out = int(usage.get("completion_tokens") or chunks)
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.cached_tokens = int(details.get("cached_tokens") or 0)
        tpot = (now - first) / (n_out - 1) if finished and first and n_out > 1 else None
        metrics = RequestMetrics(
            queue_time=None,
            ttft=None if first is None else first - start,
            tpot=tpot,
            latency=now - start if finished else None,
            num_prompt_tokens=self.prompt_tokens,
            num_output_tokens=n_out,
            num_cached_tokens=self.cached_tokens,
            num_preemptions=0,
        )
        return RequestOutput(self.rid, text, [], delta, [], finished, reason, metrics)


async def _sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent-event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except json.JSONDecodeError as exc:
            raise EngineError(f"the server sent an unreadable event: {payload[:200]!r}") from exc


def _wire_prompt(prompt: Prompt) -> str | list[int]:
    """A prompt as the API takes it: text, or token ids. Segment lists are sent as their
    text (the runtime sends text to engines without `segments`)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(s, Segment) for s in prompt):
        if any(s.text is None for s in prompt):
            raise NotSupportedError(
                "a remote engine takes text prompts; a Segment of token ids cannot be mixed in"
            )
        return "".join(s.text or "" for s in prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise InvalidRequestError(
        f"a prompt must be a str, a list of token ids or a list of Segments, got {prompt!r}"
    )


def _wire_params(p: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {"max_tokens": p.max_tokens, "temperature": p.temperature}
    if p.top_p != 1.0:
        out["top_p"] = p.top_p
    if p.seed is not None:
        out["seed"] = p.seed
    if p.stop:
        out["stop"] = list(p.stop)
    if p.top_k:
        out["top_k"] = p.top_k
    if p.ignore_eos:
        out["ignore_eos"] = True
    if p.stop_token_ids:
        out["stop_token_ids"] = list(p.stop_token_ids)
    if p.include_stop_str_in_output:
        out["include_stop_str_in_output"] = True
    return out


# OpenAI's error types (what an `error` event carries in place of a status) -> status.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "service_unavailable": 503,
    "overloaded_error": 503,
}


def _event_status(error: Any) -> int:
    """The HTTP status an `error` event stands for: its own `code` when that is a status
    (vLLM), else its OpenAI `type`; 500 when it says neither."""
    if not isinstance(error, dict):
        return 500
    code = error.get("code")
    if isinstance(code, int) and 400 <= code < 600:
        return code
    return _TYPE_STATUS.get(str(error.get("type")), 500)


def _http_error(status: int, text: str, what: str) -> CoveyError:
    """The error-tree class for an HTTP failure, with the server's own message."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    message = f"remote server answered {status} for {what}: {message}"
    if status == 404:
        return ModelNotFoundError(message)
    if status in (401, 403):
        return RemoteAuthError(message)
    if status == 429:
        return EngineOverloadedError(message)
    if status == 503:
        return EngineUnavailableError(message)
    if 400 <= status < 500:
        return InvalidRequestError(message)
    return EngineError(message)


def _resolve_tokenizer(
    spec: ChatTokenizer | str | Path | None, model: str | None
) -> ChatTokenizer | None:
    """`spec` "auto": the local tokenizer of the model the server names, if covey can load
    it (else None); a str or Path: that model's tokenizer; a tokenizer object: itself."""
    from covey.llm_backend.tokenizer import load_tokenizer

    if spec is None:
        return None
    if isinstance(spec, ChatTokenizer):
        return spec
    if spec == "auto":
        try:
            return load_tokenizer(model)
        except CoveyError:
            return None
    return load_tokenizer(spec)
