"""The request bodies of covey's OpenAI-compatible API, as pydantic models.

They take what the official `openai` client sends, and refuse, naming the field, what
covey does not do (tools, logprobs, penalties, logit bias, JSON mode) instead of silently
ignoring a parameter that would change the answer. A few parameters outside OpenAI's API
that vLLM also takes (`top_k`, `ignore_eos`, `stop_token_ids`,
`include_stop_str_in_output`) are accepted, so `RemoteEngine` can send every
`SamplingParams` field. Any other field is kept aside (`unrecognized`) for the routes to
refuse, as OpenAI's own API does ("unrecognized request argument"): a typo such as
`max_token` would otherwise run to the server's limit, and a sampling parameter covey lacks
(`min_p`, `repetition_penalty`, `reasoning_effort`) would change nothing without a word.
Booleans are strict: `"stream": "yes"` is refused, not read as true. Limits that depend on
the server's settings (max_tokens, n) are checked by the routes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from covey.llm_backend.tokenizer import ROLE_ALIASES

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)


class StreamOptions(BaseModel):
    """A misspelt option (`include_usgae`) is refused: dropped, the reply would silently
    lack its usage."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields /v1/chat/completions and /v1/completions share. Unknown fields are kept in
    `model_extra` (not dropped) so that `unrecognized` can name them; the published schema
    says none is allowed, as the server answers."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # OpenAI parameters that change nothing a covey server answers: accepted, then unused.
    # Storing and tagging the completion on OpenAI's side, its billing tier, tool calls in
    # parallel (tools themselves are refused), and identifiers of the caller.
    user: str | None = None
    store: StrictBool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: StrictBool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's extensions, so every SamplingParams field can be sent.
    top_k: int | None = Field(None, ge=0)
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: StrictBool | None = False
    # OpenAI parameters covey does not implement: accepted only at their neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    def unrecognized(self) -> list[str]:
        """The fields sent that no parameter here takes, in the order sent; one sent as null
        asks for nothing (clients that serialise every field send them) and passes."""
        return [k for k, v in (self.model_extra or {}).items() if v is not None]

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported by covey; leave it 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by covey")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("logprobs are not supported by covey")
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; `developer` is OpenAI's newer name for `system`. Tool messages and
    non-text content parts are refused by validation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_message(self) -> dict[str, str]:
        role = ROLE_ALIASES.get(self.role, self.role)
        return {"role": role, "content": self.text()}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool and function calling are not supported by covey")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise ValueError("tool and function calling are not supported by covey")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        older = info.data.get("max_tokens")
        if value is not None and older is not None and value != older:
            raise ValueError(
                f"{value} differs from max_tokens ({older}); give one of the two (they are "
                "the same limit), or both equal"
            )
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type", "text") != "text":
            raise ValueError("only the 'text' response format is supported by covey")
        return value

    def output_limit(self) -> int | None:
        """`max_completion_tokens` is the newer name of `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: StrictBool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported by covey")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by covey")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported by covey; use n")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts to complete: one string, strings, token ids, or lists of ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def output_limit(self) -> int | None:
        return self.max_tokens
