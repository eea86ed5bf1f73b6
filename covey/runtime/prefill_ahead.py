"""Prefill what a waiting LLM call already knows, while the nodes it waits on still run.

A call's prompt is known segment by segment: static text and request inputs when the run
starts, an upstream output when that node finishes. Since a token's KV depends only on
the tokens before it, the leading run of known segments can be prefilled into the prefix
cache at once (Teola's partial prefill); when the call finally starts, the engine finds
that prefix computed, or still being computed and waits a step for it. Each call's
leading static text is the same for every request: it is prefilled once per app and
pinned. Every run asks for the pin again: the engine answers at once for a pin it
holds (which keeps it fresh), and pins yield when requests need the room, so a released
one is pinned again by the next run. All of this is best effort: a prefill that fails
only loses the speedup, and an engine without the `prefill` capability simply gets none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from covey.graph.ir import llm_template
from covey.graph.lowering import Primitive, known_prefix
from covey.graph.plan import NodePlan, Plan
from covey.llm_backend.engine_client import ChatTokenizer, EngineClient
from covey.runtime.branches import guard_open
from covey.runtime.render import leading_prompt
from covey.runtime.trace import RequestTrace, Trace

log = logging.getLogger(__name__)


def _leading_pins(prims: tuple[Primitive, ...]) -> int:
    """How many leading segments the prefill-decomposition pass marked to pin."""
    return next((i for i, p in enumerate(prims) if not p.pin), len(prims))


class PrefillAhead:
    """One run's prefills ahead of its LLM calls; `pins` is shared by the runtime's runs."""

    def __init__(
        self,
        llm: EngineClient,
        plan: Plan,
        values: dict[str, Any],
        tokenizer: ChatTokenizer | None,
        trace: Trace,
        pins: set[str],
    ) -> None:
        self.llm = llm
        self.enabled = llm.capabilities.prefill
        self.plan, self.values, self.tokenizer = plan, values, tokenizer
        self.trace, self.pins = trace, pins
        self.tasks: list[asyncio.Task[None]] = []
        self._known: dict[str, int] = {}  # node -> leading segments already prefilled
        self._sent: set[str] = set()  # prompt keys submitted in this run

    def start(self) -> None:
        """At run start: pin each call's static prefix, prefill what waiting calls know."""
        for node in self.plan.llm_calls():
            self._submit(node, _leading_pins(node.primitives), pin=True)
        self.advance(n for n in self.plan.llm_calls() if n.deps)

    def advance(self, waiting: Iterable[NodePlan]) -> None:
        """Prefill the known prefix of each call still `waiting` on other nodes, if it grew
        (a call about to start is left out: its own request prefills it)."""
        for node in waiting:
            # In a route branch or loop iteration: only once it is known to run; its
            # static start was pinned at run start like every call's.
            if node.primitives and guard_open(node.guard, self.values):
                count = known_prefix(node.primitives, self.values)
                self._submit(node, count, pin=False)
                self._known[node.name] = max(self._known.get(node.name, 0), count)

    def _submit(self, node: NodePlan, count: int, pin: bool) -> None:
        """Prefill the node's first `count` segments (pinned if `pin`) unless done before."""
        prims = node.primitives
        done_before = 0 if pin else self._known.get(node.name, 0)
        if not self.enabled or count <= done_before:
            return
        template = llm_template(node.op)
        uses_roles = template.uses_roles if template is not None else False
        resolve = lambda p: self.values[str(p.var)]  # noqa: E731
        as_text = not self.llm.capabilities.segments
        prompt = leading_prompt(prims, count, resolve, self.tokenizer, uses_roles, as_text)
        if prompt is None:
            return
        key = hashlib.sha1(repr(prompt).encode()).hexdigest()[:16]
        pin_key = f"{self.plan.app}:{key}" if pin else None
        if key in self._sent:
            return
        self._sent.add(key)
        self.tasks.append(asyncio.ensure_future(self._run(prompt, node.priority, pin_key)))

    async def _run(self, prompt: Any, priority: int, pin: str | None) -> None:
        try:
            out = await self.llm.prefill(prompt, priority=priority, pin=pin)
            if pin is not None:  # record only what the engine really holds (pins are capped)
                if pin in await self.llm.pinned():
                    self.pins.add(pin)
                else:
                    self.pins.discard(pin)
        except Exception as exc:  # an optimization, never a reason to fail the run
            log.debug("prefill ahead failed: %s", exc)
            return
        if out is not None:
            record = RequestTrace.of(out.request_id, pin or "early", out)
            # a prefill samples a token only to finish its step; it outputs nothing
            self.trace.prefills.append(replace(record, generated_tokens=0))

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
