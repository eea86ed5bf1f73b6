"""Prefill what a waiting LLM call already knows, while the nodes it waits on still run.

A call's prompt is known segment by segment: static text and request inputs when the run
starts, an upstream output when that node finishes. Since a token's KV depends only on
the tokens before it, the leading run of known segments can be prefilled into the prefix
cache at once (Teola's partial prefill); when the call finally starts, the engine finds
that prefix computed, or still being computed and waits a step for it. Each call's
leading static text is the same for every request: it is prefilled once per app and
pinned. All of this is best effort: a prefill that fails only loses the speedup, and an
engine without the `prefill` capability simply gets none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from covey.graph.ir import llm_template
from covey.graph.lowering import Primitive
from covey.graph.plan import NodePlan, Plan
from covey.llm_backend.engine_client import ChatTokenizer, EngineClient
from covey.runtime.render import leading_prompt
from covey.runtime.trace import RequestTrace, Trace

log = logging.getLogger(__name__)


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
            self._submit(node, lambda p: p.pin, pin=True)
        self.advance(n for n in self.plan.llm_calls() if n.deps)

    def advance(self, waiting: Iterable[NodePlan]) -> None:
        """Prefill the known prefix of each call still `waiting` on other nodes, if it grew
        (a call about to start is left out: its own request prefills it)."""
        for node in waiting:
            if node.primitives:
                count = self._submit(node, self._known_now, pin=False)
                self._known[node.name] = max(self._known.get(node.name, 0), count)

    def _known_now(self, prim: Primitive) -> bool:
        return prim.known(self.values)

    def _submit(self, node: NodePlan, ready: Callable[[Primitive], bool], pin: bool) -> int:
        """Prefill the node's leading `ready` segments unless done before; returns their count."""
        prims = node.primitives
        count = 0
        while count < len(prims) and prims[count].op == "prefill" and ready(prims[count]):
            count += 1
        done_before = 0 if pin else self._known.get(node.name, 0)
        if not self.enabled or count <= done_before:
            return count
        template = llm_template(node.op)
        uses_roles = template.uses_roles if template is not None else False
        resolve = lambda p: self.values[str(p.var)]  # noqa: E731
        as_text = not self.llm.capabilities.segments
        prompt = leading_prompt(prims, count, resolve, self.tokenizer, uses_roles, as_text)
        if prompt is None:
            return count
        key = hashlib.sha1(repr(prompt).encode()).hexdigest()[:16]
        pin_key = f"{self.plan.app}:{key}" if pin else None
        if key in self._sent or pin_key in self.pins:
            return count
        self._sent.add(key)
        self.tasks.append(asyncio.ensure_future(self._run(prompt, node.priority, pin_key)))
        return count

    async def _run(self, prompt: Any, priority: int, pin: str | None) -> None:
        try:
            out = await self.llm.prefill(prompt, priority=priority, pin=pin)
            if pin is not None and pin in await self.llm.pinned():
                self.pins.add(pin)  # only what the engine really holds (it caps pins)
        except Exception as exc:  # an optimization, never a reason to fail the run
            log.debug("prefill ahead failed: %s", exc)
            return
        if out is not None:
            m = out.metrics
            self.trace.prefills.append(
                RequestTrace(
                    out.request_id,
                    pin or "early",
                    m.num_prompt_tokens,
                    0,
                    m.num_cached_tokens,
                    out.finish_reason,
                )
            )

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
