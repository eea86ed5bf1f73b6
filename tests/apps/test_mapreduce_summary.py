"""Map-reduce summary end to end on the real model."""

from __future__ import annotations

from covey.apps.mapreduce_summary import build_summary_app

from .conftest import DOCS

APP = build_summary_app(piece_chars=400, piece_max_tokens=12, summary_max_tokens=16)
TEXT = "\n\n".join(DOCS.values())


async def test_each_piece_is_summarized_then_combined(runtime):
    run = await runtime.run_traced(APP, text=TEXT)
    out, trace = run.outputs, run.trace
    pieces, partials = out["pieces"], out["partial_summaries"]
    assert len(pieces) == 3 and all(len(p) <= 400 for p in pieces)
    assert len(partials) == len(pieces) and all(s.strip() for s in partials)
    assert out["summary"].strip()
    fan_out = trace.nodes["map_summarize_piece"].requests
    assert len(fan_out) == len(pieces) and all(r.generated_tokens <= 12 for r in fan_out)
    assert trace.nodes["combine_summaries"].requests[0].generated_tokens <= 16
