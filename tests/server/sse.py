"""Read a server-sent-event stream from the test server into (event, data) pairs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
    if data:
        yield kind, json.loads("\n".join(data))


QUESTION = "How do I open a file so that it is always closed?"
TEXT = (
    "The with statement wraps a block in a context manager. Its __exit__ method runs even "
    "when the block raises.\n\nOpen files with a with statement so they are always closed."
)


def sample_inputs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inputs for any built-in app from its input JSON schema: a question, a text to
    summarize, or an empty string for the rest (a first turn's history)."""
    values = {"question": QUESTION, "text": TEXT}
    return {name: values.get(name, "") for name in schema.get("required", [])}
