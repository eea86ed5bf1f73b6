"""Control flow at definition time: cg.route and cg.loop build guarded nodes, explain() and
the exports show them, wiring mistakes are GraphErrors, and Python control flow on a
semantic variable is a GraphError naming the construct to use instead."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest

import covey.graph as cg
from covey.errors import GraphError, TypeMismatchError
from covey.graph.control_ops import Cond
from covey.graph.shared_prefixes import sent_together


@cg.semantic_function
def classify(ticket: str):
    """Ticket: {{ticket}}
Category:{{gen category choices="hardware|billing|other"}}"""


@cg.semantic_function
def hardware(ticket: str):
    """You fix hardware. Ticket: {{ticket}}
Reply:{{gen reply max_tokens=8}}"""


@cg.semantic_function
def billing(ticket: str):
    """You handle invoices and refunds. Ticket: {{ticket}}
Reply:{{gen reply max_tokens=8}}"""


@cg.semantic_function
def rewrite(query: str):
    """Rewrite the search query: {{query}}
Query:{{gen better max_tokens=8}}"""


@cg.function
def long_enough(query: str) -> bool:
    return len(query) > 20


def _triage() -> cg.App:
    @cg.app
    def triage(ticket: str):
        category = classify(ticket)
        return cg.route(
            category,
            {"hardware": lambda: hardware(ticket), "billing": lambda: billing(ticket)},
            default=lambda: "A person will get back to you.",
        )

    return triage


def _retry(max_iters: int = 3) -> cg.App:
    @cg.app
    def retry(question: str):
        out = cg.loop(
            lambda query: {"query": rewrite(query)},
            init={"query": question},
            until=long_enough,
            max_iters=max_iters,
        )
        return {"query": out.query, "iterations": out.iterations}

    return retry


# --- route -------------------------------------------------------------------------------


def test_route_guards_each_branch_and_merges_its_output():
    app = _triage()
    plan = app.plan
    assert list(app.outputs) == ["reply"]  # both branches return a `reply` gen
    assert plan.nodes["route"].kind == "route" and plan.nodes["route"].deps == ("classify",)
    assert plan.nodes["hardware"].guard == (Cond("route", "branch", "hardware"),)
    assert plan.nodes["billing"].guard == (Cond("route", "branch", "billing"),)
    assert plan.nodes["classify"].guard == ()
    assert set(plan.nodes["route_merge"].deps) == {"route", "hardware", "billing"}
    # exclusive branches never reach the engine together
    assert not sent_together(plan.nodes["hardware"], plan.nodes["billing"])


def test_explain_shows_the_branches_and_what_prefill_ahead_does_for_them():
    text = _triage().explain()
    assert "  hardware [llm]: after route; only when route took 'hardware'" in text
    assert "  route: route on classify.category; only the taken branch runs" in text
    assert "    'hardware' -> hardware" in text
    assert "    <default> -> no nodes (returns a value)" in text
    assert "    then route_merge: the taken branch's reply" in text
    assert "sent with" not in text
    assert "    - critical path: classify -> route -> hardware | billing -> route_merge" in text
    hardware_call = text[text.index("  hardware: priority") :]
    assert hardware_call.splitlines()[1] == (
        "    prefill-ahead pins its first 1 static segment(s) once per app"
    )
    assert "prefills its known segments past the pin only once that holds" in hardware_call


def test_mermaid_and_dot_box_each_branch_and_dash_control_edges():
    app = _triage()
    mermaid = app.to_mermaid()
    assert '    n_route{"route: route p0"}' in mermaid
    assert "subgraph scope1[\"when route took 'hardware'\"]" in mermaid
    assert '    n_route -.->|"hardware"| n_hardware' in mermaid
    assert '    n_hardware -->|"hardware.reply"| n_route_merge' in mermaid
    dot = app.to_dot()
    assert '"route" [label="route: route p0", shape=diamond];' in dot
    assert "subgraph cluster_2 {" in dot and "label=\"when route took 'billing'\"" in dot
    assert '    "route" -> "billing" [label="billing", style=dashed];' in dot
    assert dot.count("{") == dot.count("}")


def test_a_branch_key_outside_the_gens_choices_is_an_error_with_a_suggestion():
    with pytest.raises(GraphError, match=r"branch 'hardwre' can never be taken.*'hardware'"):

        @cg.app
        def typo(ticket: str):
            return cg.route(classify(ticket), {"hardwre": lambda: hardware(ticket)}, default=str)


def test_choices_without_a_branch_need_a_default():
    with pytest.raises(GraphError, match=r"may be 'billing', 'other', which no branch takes"):

        @cg.app
        def partial(ticket: str):
            return cg.route(classify(ticket), {"hardware": lambda: hardware(ticket)})


def test_branch_keys_must_fit_the_routed_type():
    with pytest.raises(TypeMismatchError, match=r"branch key 1 \(int\) can never equal"):

        @cg.app
        def wrong(ticket: str):
            return cg.route(ticket, {1: lambda: "one"}, default=lambda: "other")


def test_a_branch_key_may_contain_colons():
    @cg.app
    def typed(ticket: str):
        return cg.route(
            ticket,
            {"type:a": lambda: hardware(ticket), "priority: high": lambda: {"reply": "soon"}},
            default=lambda: {"reply": "later"},
        )

    plan = typed.plan
    assert plan.nodes["hardware"].guard == (Cond("route", "branch", "type:a"),)
    assert set(plan.nodes["route_merge"].args) >= {"type:a:reply", "priority: high:reply"}


def test_output_names_are_identifiers():
    with pytest.raises(GraphError, match=r"output names are identifiers.*rename 'a:b'"):

        @cg.app
        def odd(ticket: str):
            return cg.route(ticket, {"x": lambda: {"a:b": "x"}}, default=lambda: {"a:b": "y"})


def test_a_variable_as_a_branch_key_is_refused_at_definition():
    @cg.function
    def anything(x: str) -> Any:
        return x

    message = (
        r"branch keys are values known at definition, got the variable 'other'; "
        r"to compare 'anything.result' with it, compute the test in a @cg.function"
    )
    with pytest.raises(GraphError, match=message):

        @cg.app
        def same(ticket: str, other: str):
            return cg.route(anything(ticket), {other: lambda: "same"}, default=lambda: "diff")


def test_branches_must_return_the_same_outputs():
    with pytest.raises(GraphError, match=r"every branch must return the same outputs"):

        @cg.app
        def uneven(ticket: str):
            return cg.route(
                ticket,
                {"a": lambda: {"reply": hardware(ticket)}, "b": lambda: {"answer": "b"}},
                default=lambda: {"reply": "c"},
            )


def test_a_branch_is_a_function_of_no_arguments():
    with pytest.raises(GraphError, match=r"takes no arguments.*lambda: hardware\(ticket\)"):

        @cg.app
        def direct(ticket: str):
            return cg.route(ticket, {"a": hardware}, default=lambda: "x")

    with pytest.raises(GraphError, match=r"must be a function that wires nodes"):

        @cg.app
        def literal(ticket: str):
            return cg.route(ticket, {"a": "yes"}, default=lambda: "x")


def test_a_variable_made_in_a_branch_cannot_be_read_outside_it():
    @cg.semantic_function
    def polish(text: str):
        """Polish: {{text}}{{gen out max_tokens=4}}"""

    inner = {}

    def hw_branch(ticket):
        inner["reply"] = hardware(ticket)
        return inner["reply"]

    with pytest.raises(GraphError, match=r"reads 'hardware.reply', which exists only when "):

        @cg.app
        def leaky(ticket: str):
            cg.route(ticket, {"a": lambda: hw_branch(ticket)}, default=lambda: "x")
            return polish(inner["reply"])

    with pytest.raises(GraphError, match=r"output 'reply' is 'hardware.reply', which exists"):

        @cg.app
        def leaky_output(ticket: str):
            cg.route(ticket, {"a": lambda: hw_branch(ticket)}, default=lambda: "x")
            return inner["reply"]


def test_routes_nest_and_a_literal_branch_has_its_own_type():
    @cg.function
    def urgent(ticket: str) -> bool:
        return "!" in ticket

    @cg.app
    def nested(ticket: str):
        category = classify(ticket)
        return cg.route(
            category,
            {
                "hardware": lambda: cg.route(
                    urgent(ticket),
                    {True: lambda: hardware(ticket)},
                    default=lambda: "queued",
                    name="urgency",
                )
            },
            default=lambda: billing(ticket),
        )

    plan = nested.plan
    assert plan.nodes["urgency"].guard == (Cond("route", "branch", "hardware"),)
    assert plan.nodes["hardware"].guard == (
        Cond("route", "branch", "hardware"),
        Cond("urgency", "branch", "True"),
    )
    assert plan.nodes["billing"].guard == (Cond("route", "branch", "<default>"),)
    assert "  hardware [llm]: after urgency; only when urgency took 'True'" in nested.explain()


# --- loop --------------------------------------------------------------------------------


def test_loop_unrolls_max_iters_guarded_iterations():
    plan = _retry().plan
    assert [n for n in plan.nodes if n.startswith("rewrite")] == [
        "rewrite@1",
        "rewrite@2",
        "rewrite@3",
    ]
    assert plan.nodes["rewrite@1"].guard == ()
    assert plan.nodes["rewrite@3"].guard == (
        Cond("loop_until@1", "again", True),
        Cond("loop_until@2", "again", True),
    )
    assert "loop_until@2" in plan.nodes["rewrite@3"].deps  # waits for the decision
    assert plan.nodes["loop"].kind == "loop"
    assert plan.outputs["iterations"].type is int


def test_explain_and_exports_show_each_iteration():
    app = _retry(2)
    text = app.explain()
    assert "  loop: loop, at most 2 iteration(s), until long_enough(query)" in text
    assert "    iteration 1: rewrite@1, loop_until@1" in text
    assert "    iteration 2 (if loop_until@1 says again): rewrite@2, loop_until@2" in text
    assert (
        "  rewrite@2 [llm]: after loop_until@1, rewrite@1; only when loop_until@1 says again"
    ) in text
    mermaid = app.to_mermaid()
    assert '    n_loop_until_1{{"loop_until@1: check p0"}}' in mermaid
    assert '    n_loop_until_1 -.->|"again"| n_rewrite_2' in mermaid
    dot = app.to_dot()
    assert '"loop_until@1" [label="loop_until@1: check p0", shape=hexagon];' in dot
    nodes = set(re.findall(r'^    "([^"]+)" \[label=', dot, re.M))
    assert nodes == {"rewrite@1", "rewrite@2", "loop_until@1", "loop_until@2", "loop"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iters": 0}, r"max_iters must be an integer from 1 to 16 \(loops are unrolled"),
        ({"max_iters": 17}, r"max_iters must be an integer from 1 to 16 .*, got 17"),
        ({"max_iters": 2.0}, r"max_iters must be an integer, got 2.0"),
        ({"max_iters": 2, "while_": long_enough}, r"exactly one of until= or while_="),
    ],
)
def test_loop_bounds_are_checked_at_definition(kwargs, message):
    kwargs.setdefault("until", long_enough)
    with pytest.raises(GraphError, match=message):

        @cg.app
        def bad(question: str):
            return cg.loop(
                lambda query: {"query": rewrite(query)}, init={"query": question}, **kwargs
            ).query


def test_loop_wiring_mistakes_are_named():
    with pytest.raises(GraphError, match=r"predicate's parameter 'answer' is not a body output"):

        @cg.app
        def unknown(question: str):
            body = lambda query: {"query": rewrite(query)}  # noqa: E731
            return cg.loop(body, init={"query": question}, until=lambda answer: True,
                           max_iters=2).query

    with pytest.raises(GraphError, match=r"must match init \(question\)"):

        @cg.app
        def mismatch(question: str):
            body = lambda query: {"query": rewrite(query)}  # noqa: E731
            return cg.loop(body, init={"question": question}, until=long_enough,
                           max_iters=2).query

    with pytest.raises(GraphError, match=r"must return the next state too"):

        @cg.app
        def stateless(question: str):
            body = lambda query: {"other": rewrite(query)}  # noqa: E731
            return cg.loop(body, init={"query": question}, until=lambda other: True,
                           max_iters=2).other

    with pytest.raises(GraphError, match=r"call it in the body, return its output"):

        @cg.app
        def llm_predicate(question: str):
            body = lambda query: {"query": rewrite(query)}  # noqa: E731
            return cg.loop(body, init={"query": question}, until=rewrite, max_iters=2).query


# --- Python control flow on a semantic variable ------------------------------------------


def _define(body) -> None:
    @cg.app
    def misuse(ticket: str):
        category = classify(ticket)
        body(category)
        return category


@pytest.mark.parametrize(
    ("body", "did", "instead"),
    [
        (lambda v: bool(v), "used as a truth value", r"cg\.route\(classify\.category"),
        (lambda v: 1 if v else 0, "used as a truth value", r"cg\.loop\(body, until="),
        (lambda v: v == "hardware", r"compared with a value \(==, !=\)", r"cg\.route"),
        (lambda v: "hardware" != v, r"compared with a value", r"@cg\.function"),
        (lambda v: [x for x in v], "iterated over", r"cg\.map\(node, over=classify\.category"),
        (lambda v: len(v), r"passed to len\(\)", r"@cg\.function"),
        (lambda v: "hard" in v, "tested with `in`", r"@cg\.function"),
        (lambda v: v > "a", "ordered against a value", r"cg\.route"),
        (lambda v: f"Category: {v}", "formatted into a string", r"\{\{category\}\}"),
        (lambda v: "Category: " + v, r"used with \+", r"@cg\.function"),
        (lambda v: v[0], "indexed or sliced", r"@cg\.function"),
    ],
)
def test_python_control_flow_on_a_variable_names_the_construct_to_use(body, did, instead):
    with pytest.raises(GraphError) as info:
        _define(body)
    message = str(info.value)
    assert message.startswith("app 'misuse': semantic variable 'classify.category' was ")
    assert re.search(did, message) and re.search(instead, message)
    assert "no value until the app runs" in message


def test_an_if_on_a_comparison_fails_instead_of_baking_in_a_branch():
    with pytest.raises(GraphError, match=r"compared with a value"):

        @cg.app
        def silent(ticket: str):
            category = classify(ticket)
            if category == "hardware":
                return hardware(ticket)
            return billing(ticket)


def test_variables_still_compare_and_hash_as_graph_values():
    app = _triage()
    var = app.outputs["reply"]
    assert var == app.outputs["reply"] and not (var != app.outputs["reply"])
    assert {var: 1}[app.outputs["reply"]] == 1
    assert var != app.inputs["ticket"]
    assert repr(var) == "Var(route_merge.reply)"


def test_a_loop_whose_iteration_count_nobody_reads_defines_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @cg.app
        def quiet(question: str):
            body = lambda query: {"query": rewrite(query)}  # noqa: E731
            return cg.loop(body, init={"query": question}, until=long_enough, max_iters=2).query

    assert "iterations" not in quiet.outputs


def test_exports_keep_branch_keys_whole_and_quote_them():
    @cg.function
    def mood(ticket: str) -> str:
        return ticket

    @cg.app
    def odd_keys(ticket: str):
        return cg.route(
            mood(ticket),
            {"?": lambda: hardware(ticket), 'say "hi"': lambda: billing(ticket)},
            default=lambda: "none",
        )

    mermaid = odd_keys.to_mermaid()
    assert '    n_route -.->|"?"| n_hardware' in mermaid
    assert '    n_route -.->|"say #quot;hi#quot;"| n_billing' in mermaid
    dot = odd_keys.to_dot()
    assert '    "route" -> "hardware" [label="?", style=dashed];' in dot
    assert '    "route" -> "billing" [label="say \\"hi\\"", style=dashed];' in dot


def test_the_default_label_is_not_a_branch_key_and_colliding_keys_are_named():
    @cg.function
    def mood(ticket: str) -> str:
        return ticket

    with pytest.raises(GraphError, match=r"'<default>' is reserved for the default branch; "):

        @cg.app
        def reserved(ticket: str):
            return cg.route(mood(ticket), {"<default>": lambda: hardware(ticket)})

    @cg.function
    def level(ticket: str) -> int | str:
        return 1

    with pytest.raises(GraphError, match=r"branch keys 1 and '1' collide"):

        @cg.app
        def twice(ticket: str):
            return cg.route(level(ticket), {1: lambda: "a", "1": lambda: "b"}, default=lambda: "c")
