"""RAG apps over a user's own index must not tell the model the documents are about Python."""

from __future__ import annotations

import re

import pytest

from covey.apps import advanced_rag, rag_chatbot
from covey.apps.prompt_subject import reworded
from covey.server.server_builder import builtin_apps

PAIRS = [
    (rag_chatbot.answer_with_citations, rag_chatbot.answer_neutrally),
    (advanced_rag.rewrite_query, advanced_rag.rewrite_neutrally),
    (advanced_rag.answer_from_passages, advanced_rag.answer_neutrally),
]


def variables(doc: str) -> list[str]:
    return re.findall(r"\{\{[^}]*\}\}", doc)


@pytest.mark.parametrize("original, neutral", PAIRS, ids=lambda f: f.__name__)
def test_neutral_prompt_names_no_subject_and_keeps_its_structure(original, neutral):
    assert "Python" in original.__doc__
    assert "Python" not in neutral.__doc__
    assert variables(neutral.__doc__) == variables(original.__doc__)
    assert neutral.__annotations__ == original.__annotations__
    assert "Python" in original.__doc__  # the original is left as it was


def test_neutral_angles_name_no_subject():
    assert not any("Python" in a for a in advanced_rag.NEUTRAL_ANGLES)
    assert len(advanced_rag.NEUTRAL_ANGLES) == len(advanced_rag.ANGLES)


def test_a_phrase_missing_from_the_prompt_is_an_error():
    with pytest.raises(ValueError, match="no longer contains"):
        reworded(rag_chatbot.answer_with_citations, {"for Rust programmers": ""})


def prompts(app) -> str:
    """Every LLM call's template in the app's graph, and the tools it offers the model
    (names and descriptions), as text."""
    ops = [data["op"] for _, data in app.graph.nodes(data=True)]
    calls = [op for op in ops if type(op).__name__ == "LLMCall"]
    tools = [
        f"{name}: {spec.description}"
        for op in calls if op.tools is not None for name, spec in op.tools.offered.items()
    ]
    return "".join(str(op.template) for op in calls) + "\n".join(tools)


@pytest.mark.parametrize("name", ["rag_chatbot", "advanced_rag", "tool_agent"])
def test_builtin_apps_word_their_prompts_by_index(name):
    assert "Python" in prompts(builtin_apps(max_tokens=8)[name])
    neutral = prompts(builtin_apps(max_tokens=8, python_docs=False)[name])
    assert neutral and "python" not in neutral.lower()


def test_the_tool_agent_s_docs_tool_is_neutral_over_an_index_of_one_s_own():
    offered = builtin_apps(max_tokens=8, python_docs=False)["tool_agent"]
    tools = offered.plan.nodes["agent"].op.tools.offered
    assert set(tools) == {"calculator", "search_docs"}
    assert "search_docs" in prompts(offered)  # the prompt names the tool the model has
