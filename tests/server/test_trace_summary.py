"""The REST trace summary reports each LLM node's prefix-cache and chunk-store reuse."""

from __future__ import annotations

from covey.runtime.trace import NodeTrace, RequestTrace, Trace
from covey.server.json_encoding import trace_summary


def test_a_node_reports_the_tokens_its_requests_reused_from_the_chunk_store():
    trace = Trace(app="rag", run_id="r1")
    node = NodeTrace(node="answer", kind="llm", start=0.0, end=1.0, status="done")
    node.requests += [
        RequestTrace("r1:a", "answer", 900, 8, 48, "length", ttft=0.2, reused_tokens=600),
        RequestTrace("r1:b", "answer", 700, 8, 0, "length", ttft=0.3, reused_tokens=250),
    ]
    trace.nodes["answer"] = node
    other = NodeTrace(node="rewrite", kind="llm", start=0.0, end=0.5, status="done")
    other.requests.append(RequestTrace("r1:c", "q", 90, 8, 0, "stop", reused_tokens=40))
    trace.nodes["rewrite"] = other
    summary = trace_summary(trace)
    entry = summary["nodes"][0]
    assert entry["reused_tokens"] == 850 and summary["reused_tokens"] == 890
    assert entry["cached_tokens"] == 48
    assert entry["prompt_tokens"] == 1600
