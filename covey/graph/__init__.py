"""The app DSL, its graph IR and the optimizer passes.

Write semantic functions, tools and functions, wire them in an `@app`, read the plan with
`app.explain()`. Defining an app validates and optimizes it; nothing runs a model.
"""

from __future__ import annotations

from covey.graph.app import App, app
from covey.graph.control_flow import loop, route
from covey.graph.dsl import NodeOutputs, function, map, retrieve, semantic_function, tool
from covey.graph.ir import Const, Var
from covey.graph.lowering import Primitive
from covey.graph.plan import NodePlan, Plan
from covey.graph.validate import validate_graph

__all__ = [
    "App",
    "Const",
    "NodeOutputs",
    "NodePlan",
    "Plan",
    "Primitive",
    "Var",
    "app",
    "function",
    "loop",
    "map",
    "retrieve",
    "route",
    "semantic_function",
    "tool",
    "validate_graph",
]
