"""One test per definition-time error (and the unused-output warning), by message."""

from __future__ import annotations

from typing import Any

import pytest

import covey.graph as cg
from covey.errors import (
    CoveyError,
    CycleError,
    GraphError,
    TemplateError,
    TypeMismatchError,
    UnboundPlaceholderError,
    UnusedOutputWarning,
    WiringError,
)
from covey.retrieval.documents import SearchResult
from covey.retrieval.searcher import DEFAULT_K, DEFAULT_MODE
from tests.graph import shapes


def test_errors_share_one_tree():
    for cls in (TemplateError, UnboundPlaceholderError, WiringError, TypeMismatchError):
        assert issubclass(cls, GraphError) and issubclass(cls, CoveyError)
    assert issubclass(CycleError, GraphError)


def test_misspelled_placeholder_suggests_the_parameter():
    with pytest.raises(UnboundPlaceholderError) as e:

        @cg.semantic_function
        def ask(question: str):
            """Q: {{questoin}} A: {{gen answer}}"""

    msg = str(e.value)
    assert "semantic function 'ask': placeholder {{questoin}} is not a parameter" in msg
    assert "did you mean 'question'?" in msg and "(parameters: question: str)" in msg


def test_parameter_never_used_in_template():
    with pytest.raises(TemplateError, match=r"parameter 'style' is never used; add \{\{style\}\}"):

        @cg.semantic_function
        def ask(question: str, style: str):
            """Q: {{question}} A: {{gen answer}}"""


def test_output_named_like_a_parameter():
    with pytest.raises(TemplateError, match="output 'question' is also a parameter; rename one"):

        @cg.semantic_function
        def ask(question: str):
            """Q: {{question}} {{gen question}}"""


def test_empty_docstring():
    with pytest.raises(TemplateError, match="the docstring is the template and it is empty"):

        @cg.semantic_function
        def ask(question: str):
            pass


def test_wrong_arity_to_a_node():
    with pytest.raises(WiringError, match=r"node 'title': takes 1 inputs \(question: str\), got 2"):

        @cg.app
        def bad(q: str):
            return shapes.title(q, q)


def test_unknown_input_suggests_the_closest():
    with pytest.raises(WiringError) as e:

        @cg.app
        def bad(q: str):
            return shapes.answer(question=q, contxt=cg.retrieve(q))

    msg = str(e.value)
    assert "app 'bad', node 'answer': no input 'contxt'; did you mean 'context'?" in msg
    assert "(inputs: question: str, context: list[SearchResult])" in msg


def test_missing_input_names_it_with_its_type():
    with pytest.raises(WiringError, match=r"missing input\(s\) 'context'; pass them, e\.g\. "):

        @cg.app
        def bad(q: str):
            return shapes.answer(question=q)


def test_calling_a_node_outside_an_app():
    with pytest.raises(WiringError, match="semantic function 'title' was called outside an app"):
        shapes.title("hi")


def test_variable_from_another_app():
    leaked = []

    @cg.app
    def first(q: str):
        leaked.append(q)
        return shapes.title(q)

    with pytest.raises(WiringError, match="got variable 'q' of app 'first'; variables cannot"):

        @cg.app
        def second(q: str):
            return shapes.title(leaked[0])


def test_type_mismatch_between_connected_nodes():
    with pytest.raises(TypeMismatchError) as e:

        @cg.app
        def bad(q: str):
            return shapes.title(cg.retrieve(q))

    msg = str(e.value)
    assert "app 'bad', node 'title': input 'question' expects str" in msg
    assert "variable 'retrieve.results' is list[SearchResult]" in msg
    assert "convert it with a @covey.graph.function node" in msg


def test_type_mismatch_of_a_literal():
    with pytest.raises(TypeMismatchError, match=r"expects str but got the literal 3 \(int\)"):

        @cg.app
        def bad(q: str):
            return shapes.title(3)


def test_app_return_annotation_mismatch():
    with pytest.raises(TypeMismatchError, match="returns 'retrieve.results' of type list"):

        @cg.app
        def bad(q: str) -> str:
            return cg.retrieve(q)


def test_map_over_a_non_list():
    with pytest.raises(
        TypeMismatchError, match="map needs a list variable to fan out over, got str"
    ):

        @cg.app
        def bad(q: str):
            return cg.map(shapes.title, over=q)


def test_map_with_ambiguous_item():
    with pytest.raises(WiringError, match=r"say which input gets each element: item=<one of"):

        @cg.app
        def bad(q: str):
            return cg.map(shapes.summarize, over=cg.retrieve(q))


def test_map_item_type_mismatch():
    with pytest.raises(TypeMismatchError, match="input 'question' expects list"):

        @cg.app
        def bad(q: str):
            return cg.map(shapes.title, over=cg.retrieve(q))


def test_tool_needs_type_hints():
    with pytest.raises(GraphError, match="tool 'lookup': parameter 'key' has no type hint"):

        @cg.tool
        def lookup(key) -> str:
            return key


def test_tool_needs_a_return_hint():
    with pytest.raises(GraphError, match="tool 'lookup': add a return type hint"):

        @cg.tool
        def lookup(key: str):
            return key


def test_app_must_return_variables():
    with pytest.raises(GraphError, match="app 'bad': must return a variable or a dict"):

        @cg.app
        def bad(q: str):
            shapes.title(q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "app 'bad', retrieve: k must be a positive integer, got 0"),
        (dict(k=-2), "app 'bad', retrieve: k must be a positive integer, got -2"),
        (dict(k=2.5), "app 'bad', retrieve: k must be a positive integer, got 2.5"),
        (dict(k=True), "app 'bad', retrieve: k must be a positive integer, got True"),
        (
            dict(mode="hybird"),
            "app 'bad', retrieve: mode must be one of vector, bm25, hybrid; got 'hybird'; "
            "did you mean 'hybrid'?",
        ),
        (dict(mode=3), "app 'bad', retrieve: mode must be one of vector, bm25, hybrid; got 3"),
        (dict(index=""), "app 'bad', retrieve: index must be a non-empty name, got ''"),
    ],
)
def test_retrieve_options_are_checked_when_the_app_is_defined(kwargs, message):
    with pytest.raises(WiringError) as e:

        @cg.app
        def bad(q: str):
            return cg.retrieve(q, **kwargs)

    assert str(e.value) == message


def test_retrieve_keeps_the_searchers_settings_unless_given():
    import numpy as np

    @cg.app
    def plain(q: str):
        return cg.retrieve(q)

    @cg.app
    def tuned(q: str):
        return cg.retrieve(q, k=np.int64(3), mode="bm25")

    assert (plain.plan.nodes["retrieve"].op.k, plain.plan.nodes["retrieve"].op.mode) == (None, None)
    op = tuned.plan.nodes["retrieve"].op
    assert (op.k, op.mode) == (3, "bm25") and type(op.k) is int
    # The docstring states the defaults a node without k or mode gets from a DocumentIndex.
    doc = " ".join(str(cg.retrieve.__doc__).split())
    assert f"DEFAULT_K` ({DEFAULT_K} results) and `DEFAULT_MODE` (\"{DEFAULT_MODE}\")" in doc


def test_optimize_for_an_unknown_output():
    with pytest.raises(GraphError, match="no output 'awnser'; did you mean 'answer'"):
        shapes.two_outputs().optimize(awaited=["awnser"])


def test_optimize_for_an_output_that_is_not_a_name():
    with pytest.raises(GraphError, match=r"app 'verdict': no output 5 \(outputs: verdict\)"):
        shapes.merge().optimize(awaited=[5])


def test_cycle_names_the_nodes_and_variables():
    graph = shapes.merge().graph.copy()
    judged = cg.Var("judge.verdict", str, "judge", "verdict", "verdict")
    graph.add_edge("judge", "argue_for", vars=((judged, "question"),))
    with pytest.raises(CycleError) as e:
        cg.validate_graph(graph)
    msg = str(e.value)
    assert "app 'verdict': cycle" in msg and "judge.verdict" in msg
    assert "a node cannot depend on its own output" in msg


def test_unused_output_warns_and_the_node_is_pruned():
    with pytest.warns(UnusedOutputWarning, match="node 'title': output 'title' is never consumed"):

        @cg.app
        def extra(q: str):
            shapes.title(q)
            return shapes.rewrite(q)

    assert "title" not in extra.plan.nodes
    record = extra.plan.passes[0]
    assert record.fired and "pruned title" in record.reasons[0]


def test_an_earlier_gen_is_consumed_by_the_later_one(recwarn):
    @cg.semantic_function
    def think(question: str):
        """Q: {{question}} Think: {{gen thought}} So: {{gen answer}} Unused: {{gen extra}}"""

    @cg.app
    def reason(q: str):
        return think(q).answer

    messages = [str(w.message) for w in recwarn.list]
    assert messages == [
        "app 'reason', node 'think': output 'extra' is never consumed; use it, "
        "return it from the app, or remove it"
    ]


def test_unused_tool_output_warns_but_the_tool_still_runs():
    @cg.tool
    def notify(text: str) -> bool:
        return bool(text)

    with pytest.warns(UnusedOutputWarning, match="output 'result' is never consumed; use it"):

        @cg.app
        def side(q: str):
            notify(q)
            return shapes.title(q)

    assert side.plan.nodes["notify"].kind == "tool"


def test_multi_output_node_unpacks_and_reports_unknown_outputs():
    @cg.semantic_function
    def plan_then_answer(question: str):
        """Q: {{question}} Plan: {{gen plan max_tokens=16}} Answer: {{gen answer}}"""

    with pytest.raises(WiringError, match="no output 'anser'; did you mean 'answer'") as e:

        @cg.app
        def bad(q: str):
            return plan_then_answer(q).anser

    assert isinstance(e.value, AttributeError)  # so hasattr/getattr(default) still work

    @cg.app
    def ok(q: str) -> Any:
        plan, ans = plan_then_answer(q)
        return {"plan": plan, "answer": ans}

    assert set(ok.outputs) == {"plan", "answer"}


def test_foreign_node_outputs_cannot_be_passed_whole():
    @cg.semantic_function
    def two(question: str):
        """{{question}} {{gen a}} {{gen b}}"""

    with pytest.raises(WiringError, match="input 'question' got several outputs; pick one"):

        @cg.app
        def bad(q: str):
            return shapes.title(two(q))


def test_search_result_is_a_chunk_input():
    @cg.semantic_function
    def cite(doc: SearchResult):
        """{{doc}} {{gen cite}}"""

    assert cite.op.inputs == {"doc": SearchResult}


def test_repeated_calls_get_distinct_node_names():
    @cg.semantic_function
    def title_2(question: str):
        """{{question}} {{gen t}}"""

    @cg.app
    def many(q: str):
        return {"a": shapes.title(q), "b": title_2(q), "c": shapes.title(q)}

    assert sorted(many.graph) == ["title", "title_2", "title_3"]
    assert many.outputs["c"].name == "title_3.title"


def test_unresolvable_type_hint():
    with pytest.raises(GraphError, match="function 'f': cannot resolve its type hints"):

        @cg.function
        def f(x: NoSuchType) -> str:  # noqa: F821
            return x


def test_star_args_are_rejected():
    with pytest.raises(GraphError, match=r"function 'f': \*args is not supported; name each"):

        @cg.function
        def f(*args: str) -> str:
            return ""


def test_input_given_twice():
    with pytest.raises(WiringError, match="node 'title': input 'question' given twice"):

        @cg.app
        def bad(q: str):
            return shapes.title(q, question=q)


def test_app_returning_an_empty_dict():
    with pytest.raises(GraphError, match="app 'bad': returns no variables; return a variable"):

        @cg.app
        def bad(q: str):
            return {}


def test_output_from_a_node_not_in_the_graph():
    graph = shapes.linear().graph.copy()
    graph.remove_node("answer")
    with pytest.raises(GraphError, match="output 'answer' comes from unknown node 'answer'"):
        cg.validate_graph(graph)


def test_map_item_misspelled():
    with pytest.raises(
        WiringError, match="node 'map_summarize': no input 'dok'; did you mean 'doc'"
    ):

        @cg.app
        def bad(q: str):
            return cg.map(shapes.summarize, over=cg.retrieve(q), item="dok", question=q)


def test_calling_an_app_while_defining_another_is_a_wiring_error():
    inner = shapes.linear()
    with pytest.raises(WiringError, match="apps do not nest"):

        @cg.app
        def outer(question: str):
            return inner(question=question)


@pytest.mark.parametrize(
    "decorate, message",
    [
        (cg.semantic_function, "@semantic_function decorates a function (def ...), got 5"),
        (cg.tool, "@tool decorates a function (def ...), got 5"),
        (cg.function, "@function decorates a function (def ...), got 5"),
        (cg.app, "@app decorates a function (def ...), got 5"),
        (lambda x: cg.app(x, name="named"), "@app 'named' decorates a function (def ...), got 5"),
    ],
)
def test_decorating_what_is_not_a_function_is_a_graph_error(decorate, message):
    with pytest.raises(GraphError) as e:
        decorate(5)
    assert str(e.value) == message


def test_map_over_an_undecorated_function_is_a_wiring_error():
    def plain(text: str) -> str:
        return text

    with pytest.raises(WiringError, match=r"app 'bad', map: fans out a @semantic_function, @tool"):

        @cg.app
        def bad(q: str):
            return cg.map(plain, over=shapes.lookup(q))


def test_semantic_function_params_must_be_sampling_params():
    with pytest.raises(GraphError, match=r"params=...\) takes a SamplingParams, got \{'t': 1\}"):
        cg.semantic_function(params={"t": 1})  # type: ignore[arg-type]
