"""What a request paused for a tool call does with its KV: INFERCEPT's min-waste rule.

While a tool runs, a paused request's KV either stays in the pool (preserve), moves to host
memory and back (swap) or is freed and recomputed on resume (discard). Each choice wastes
pool memory for some time, and the rule picks the least memory x time:

- preserve: the KV the request alone holds sits idle for the tool's remaining time,
  `bytes * remaining_s`;
- discard: recomputing its tokens on resume takes `recompute_s`, during which its own KV
  and the KV of every running request wait on that compute,
  `recompute_s * (bytes + running_bytes)`;
- swap: its KV is held while it is copied out and back in, and the part of the copies that
  does not overlap compute stalls the running requests too,
  `(out_s + in_s) * bytes + (1 - overlap) * (out_s + in_s) * running_bytes`.

The tool's remaining time comes from that tool's own history of pause-to-resume times; the
costs come from a profile measured on this machine when the engine starts
(`prefill_profile.py`), never from a paper's constants. Plain Python, no torch, so scripted
cases test the rule exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import fmean

# With no history at all (no tool has come back yet) a pause is assumed to last this long:
# INFERCEPT's QA/search tools, the middle of its mix. Replaced by measurements at once.
PRIOR_TOOL_SECONDS = 1.0
HISTORY = 64  # pause-to-resume times kept per tool (the latest): tools drift over time
ANY_TOOL = ""  # the history key that pools every tool, unnamed pauses included
ACTIONS = ("preserve", "swap", "discard")


class ToolTimes:
    """Per-tool pause-to-resume times, and from them the expected time still to wait."""

    def __init__(self, history: int = HISTORY) -> None:
        self._history = history
        self._times: dict[str, deque[float]] = {}

    def record(self, tool: str | None, seconds: float) -> None:
        """One pause of `tool` (None: unnamed) lasted `seconds`."""
        for key in {tool or ANY_TOOL, ANY_TOOL}:
            self._times.setdefault(key, deque(maxlen=self._history)).append(max(seconds, 0.0))

    def remaining(self, tool: str | None, elapsed: float) -> float:
        """Expected seconds left for a pause of `tool` that has lasted `elapsed` so far: the
        mean residual of the past pauses that lasted longer. A tool with no history of its
        own borrows every tool's; with none at all, PRIOR_TOOL_SECONDS. A pause that has
        outlived every recorded one is expected to last about as long again (it is plainly
        not one of the quick ones)."""
        times = self._times.get(tool or ANY_TOOL) or self._times.get(ANY_TOOL)
        if not times:
            return max(PRIOR_TOOL_SECONDS - elapsed, elapsed)
        longer = [t - elapsed for t in times if t > elapsed]
        return fmean(longer) if longer else elapsed

    def estimates(self) -> dict[str, float]:
        """Tool name -> mean pause seconds ("" pools every tool), for metrics."""
        return {tool: fmean(times) for tool, times in self._times.items() if times}


@dataclass(frozen=True)
class PauseCosts:
    """This machine's costs, measured at engine start: recompute per token (inside a batched
    step, so no fixed part) and copies to host and back (fixed + per byte). `overlap` is
    the share of a copy that runs beside compute (0 on CPU: one memory system, one engine
    thread; the copy is engine time)."""

    recompute_per_token_s: float
    swap_out_fixed_s: float
    swap_out_per_byte_s: float
    swap_in_fixed_s: float
    swap_in_per_byte_s: float
    overlap: float = 0.0

    def recompute_s(self, tokens: int) -> float:
        return self.recompute_per_token_s * tokens

    def swap_s(self, num_bytes: int) -> float:
        """Out and back in."""
        return (
            self.swap_out_fixed_s
            + self.swap_in_fixed_s
            + (self.swap_out_per_byte_s + self.swap_in_per_byte_s) * num_bytes
        )


@dataclass(frozen=True)
class Waste:
    """Byte-seconds of pool memory each action would waste, and the least of them."""

    preserve: float
    swap: float | None  # None: this request cannot swap
    discard: float
    remaining_s: float  # the tool's expected remaining time they were computed for

    @property
    def best(self) -> str:
        options = {"preserve": self.preserve, "discard": self.discard}
        if self.swap is not None:
            options["swap"] = self.swap
        # Ties keep the KV where it is: preserve, then swap (nothing recomputed), then discard.
        return min(ACTIONS, key=lambda a: (options.get(a, float("inf")), ACTIONS.index(a)))


class PausePolicy:
    """Decides, per paused request, preserve / swap / discard (EngineConfig.pause_policy:
    "adaptive" by min-waste, or one fixed action for comparison)."""

    def __init__(self, mode: str, costs: PauseCosts | None, times: ToolTimes | None = None):
        if mode == "adaptive" and costs is None:
            raise ValueError("the adaptive pause policy needs measured costs")
        self.mode = mode
        self.costs = costs
        self.times = times or ToolTimes()

    def waste(
        self,
        num_bytes: int,
        num_tokens: int,
        running_bytes: int,
        tool: str | None,
        elapsed: float,
        can_swap: bool = True,
    ) -> Waste:
        """The min-waste terms for a paused request whose KV holds `num_tokens` tokens in
        `num_bytes` of pool memory no one else shares, while running requests hold
        `running_bytes`, paused on `tool` for `elapsed` seconds so far."""
        assert self.costs is not None
        c = self.costs
        remaining = self.times.remaining(tool, elapsed)
        recompute = c.recompute_s(num_tokens)
        copy = c.swap_s(num_bytes)
        return Waste(
            preserve=num_bytes * remaining,
            swap=copy * num_bytes + (1.0 - c.overlap) * copy * running_bytes if can_swap else None,
            discard=recompute * (num_bytes + running_bytes),
            remaining_s=remaining,
        )

    def decide(
        self,
        num_bytes: int,
        num_tokens: int,
        running_bytes: int,
        tool: str | None,
        elapsed: float,
        can_swap: bool = True,
    ) -> str:
        """"preserve", "swap" or "discard" for one paused request (see `waste`). A fixed
        policy answers its action (swap falls back to discard where it cannot swap)."""
        if self.mode != "adaptive":
            return self.mode if self.mode != "swap" or can_swap else "discard"
        return self.waste(num_bytes, num_tokens, running_bytes, tool, elapsed, can_swap).best
