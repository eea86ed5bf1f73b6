"""App outputs as JSON: what `json.dumps` cannot write on its own.

Outputs hold retrieved `SearchResult`s and `Chunk`s (frozen dataclasses), tuples, pydantic
models and numpy scalars; a response carries them as plain objects, lists and numbers.
Anything else is written as its `str`, so a user app with an odd output type still answers.
Text is written ASCII-only (JSON `\\u` escapes), so no string, even one holding a lone UTF-16
surrogate, can fail to encode once the response has begun.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from covey.runtime.trace import Trace


def to_jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return to_jsonable(item())
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(to_jsonable(value), separators=(",", ":"))


class JsonBody(Response):
    """A JSON response of any app output, encoded by `dumps`."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("ascii")


def trace_summary(trace: Trace) -> dict[str, Any]:
    """What a caller wants from a run's trace: time, tokens and cache hits per node
    (`cached_tokens` from the prefix cache, `reused_tokens` from the chunk KV store)."""
    nodes = []
    for n in trace.nodes.values():
        entry: dict[str, Any] = {
            "node": n.node,
            "kind": n.kind,
            "status": n.status,
            "seconds": None if n.duration is None else round(n.duration, 4),
        }
        if n.requests:
            entry["requests"] = len(n.requests)
            entry["prompt_tokens"] = sum(r.prompt_tokens for r in n.requests)
            entry["generated_tokens"] = n.generated_tokens
            entry["cached_tokens"] = n.cached_tokens
            entry["reused_tokens"] = n.reused_tokens
            scored = [r.choice_logprobs for r in n.requests if r.choice_logprobs is not None]
            if scored:
                entry["choice_logprobs"] = scored
        if n.search is not None:
            entry["results"] = n.search.results
        if n.tool_calls:
            entry["tool_calls"] = [
                {"tool": c.tool, "by": c.by, "error": c.error, "seconds": round(c.seconds, 4)}
                for c in n.tool_calls
            ]
        if n.error:
            entry["error"] = n.error
        nodes.append(entry)
    return {
        "app": trace.app,
        "run_id": trace.run_id,
        "seconds": None if trace.end is None else round(trace.end, 4),
        "generated_tokens": trace.generated_tokens,
        "cached_tokens": trace.cached_tokens,
        "reused_tokens": trace.reused_tokens,
        "nodes": nodes,
    }
