"""The loop a tool worker process runs: receive (function name, kwargs), send the result.

It lives apart from `covey.runtime` and imports nothing of covey, so a freshly spawned
worker starts in the time Python takes to import the tool's own module, not the runtime's
(torch and all). See `covey.runtime.tool_pool`.
"""

from __future__ import annotations

import importlib
from typing import Any


def resolve(module: str, qualname: str) -> Any:
    """The function named `module:qualname`. A tool declared with the `@tool` decorator is
    a graph node under its name; its function is the node's `op.spec.fn`."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    spec = getattr(getattr(obj, "op", None), "spec", None)
    return getattr(spec, "fn", obj)


def serve(conn: Any) -> None:
    """Run calls until the pipe closes; a call's exception is sent back as its text. The
    first message says the worker is up, so its start-up never counts against a timeout."""
    conn.send(("ready", None))
    while True:
        try:
            (module, qualname), kwargs = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # an argument's class cannot be imported here
            conn.send(("error", f"cannot read the call in its worker ({type(e).__name__}: {e})"))
            continue
        try:
            fn = resolve(module, qualname)
        except Exception as e:
            conn.send(("error", f"cannot load the tool in its worker ({type(e).__name__}: {e})"))
            continue
        try:
            reply: tuple[str, Any] = ("ok", fn(**kwargs))
        except BaseException as e:
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send(("error", f"its result cannot be sent back ({type(e).__name__}: {e})"))
