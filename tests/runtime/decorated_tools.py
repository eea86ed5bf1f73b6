"""A process tool declared with the decorator: the module attribute is the graph node, and
the worker process finds the function through it. Imports only the DSL (no torch)."""

from __future__ import annotations

import os

import covey.graph as cg


@cg.tool(executor="process", timeout=60)
def pid_squared(x: int) -> list[int]:
    return [x * x, os.getpid()]
