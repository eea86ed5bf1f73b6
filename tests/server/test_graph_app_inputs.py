"""An app input with a default in the wiring function is optional over REST, as in Python."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import covey.graph as cg
from covey.server.graph_app import GraphServedApp


@cg.semantic_function
def _answer(question: str, tone: str):
    """{{tone}} answer: {{question}} {{gen answer max_tokens=4}}"""


@cg.app
def _toned(question: str, tone: str = "A short"):
    return _answer(question=question, tone=tone)


def test_an_input_with_a_default_is_optional_and_a_required_one_is_not():
    served = GraphServedApp(_toned, runtime_getter=lambda: None)
    assert served.input_model(question="q").model_dump() == {"question": "q", "tone": "A short"}
    assert served.input_model(question="q", tone="A long").tone == "A long"
    with pytest.raises(ValidationError):
        served.input_model(tone="A long")
    schema = served.input_model.model_json_schema()
    assert schema["required"] == ["question"]
