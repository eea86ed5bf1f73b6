"""`/metrics` exports what the pause policy did with paused requests' KV, read from a real
engine after a tool call."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from covey.llm_backend.sampling_params import SamplingParams
from covey.server.metrics import ServerMetrics


async def test_pause_metrics_follow_a_real_tool_call(real_llm):
    turn = SamplingParams(max_tokens=2, ignore_eos=True, pause_at_end=True)
    stream = real_llm.generate("The calculator says", turn, request_id="tool-metrics")
    async for out in stream:
        if out.finish_reason == "paused":
            metrics = ServerMetrics()
            await metrics.refresh(real_llm)
            held = _samples(metrics.render().decode())
            await real_llm.pause("tool-metrics", tool="calculator")
            await real_llm.resume("tool-metrics", " 4.", SamplingParams(max_tokens=1))
    await metrics.refresh(real_llm)
    after = _samples(metrics.render().decode())
    assert held[("covey_paused_kv_bytes", (("where", "pool"),))] > 0
    assert after[("covey_paused_kv_bytes", (("where", "pool"),))] == 0
    assert after[("covey_tool_seconds_estimate", (("tool", "calculator"),))] > 0
    for action in ("preserve", "swap", "discard"):
        assert ("covey_pause_decisions", (("action", action),)) in after
    for direction in ("out", "in"):
        assert ("covey_pause_swap_bytes", (("direction", direction),)) in after
    assert ("covey_pause_recompute_tokens", ()) in after
    assert after[("covey_engine_threads", ())] >= 1  # the thread governor's count


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
