"""Server benchmark: covey's HTTP server against llama-cpp-python's own OpenAI-compatible
server (`llama_cpp.server`) on the same GGUF, over real HTTP on 127.0.0.1.

    python benchmarks/server.py [--quick] [--json PATH] [--plot PATH]

Workloads, each at concurrency 1, 4, 16 and 32 (`params.concurrency`; that many clients,
each sending its next request when the last one ends):
- `chat`: streamed `POST /v1/chat/completions`, short Python questions, 64-token answers
  (covey: `ignore_eos`; llama.cpp: `min_tokens`), greedy. Target: at concurrency 16 covey
  serves at least 3x llama.cpp's server's requests/s (it batches; llama.cpp's server runs
  one request at a time).
- `rag_chat`: the RAG chatbot's stream endpoint (`POST /apps/rag_chatbot/stream`: retrieval
  over the Python-docs index, then a cited answer); covey only, llama.cpp has no such app.
Metrics per record: `requests_per_s`, `p50_ttft_s`, `p99_ttft_s`, `p99_latency_s`; TTFT is
when the first answer token reaches the client. Each server runs in its own process, so
the clients never share the engine's interpreter. `--quick` sends fewer requests per level
and runs rag_chat at 1 and 4 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import parse_args, record, write_results  # noqa: E402

NAME = "server"
LEVELS = (1, 4, 16, 32)
ANSWER_TOKENS = 64
METRICS = ("requests_per_s", "p50_ttft_s", "p99_ttft_s", "p99_latency_s")
QUESTIONS = [
    "How do I reverse a list in Python?",
    "What does the with statement do?",
    "How do I read a file line by line?",
    "What is a dictionary comprehension?",
    "How do I catch two exceptions at once?",
    "What is the difference between a tuple and a list?",
    "How does a for loop work over a dict?",
    "What does the global statement do?",
]
START_TIMEOUT_S = 600.0


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"chat_levels": LEVELS, "rag_levels": (1, 4), "rounds": 1, "min_requests": 2}
    return {"chat_levels": LEVELS, "rag_levels": LEVELS, "rounds": 3, "min_requests": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_covey(port: int) -> None:
    """The covey server process: the embedded model, the Python-docs index, the built-in
    apps (what `covey serve` runs)."""
    import uvicorn

    from covey.server.app_factory import create_app
    from covey.server.server_builder import load_state
    from covey.server.state import ServerSettings

    settings = ServerSettings(port=port, max_in_flight=256)
    state = load_state(settings, progress=True)
    uvicorn.run(create_app(state), host="127.0.0.1", port=port, log_level="warning")


def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    import httpx

    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited at start; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not start in {START_TIMEOUT_S}s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def one_chat(http: Any, body: dict[str, Any]) -> tuple[float, float]:
    """(ttft, latency) of one streamed chat completion, seconds."""
    start = time.perf_counter()
    ttft = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"chat failed {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data:") and line[5:].strip() != "[DONE]":
                choices = json.loads(line[5:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
    end = time.perf_counter() - start
    return (ttft if ttft is not None else end), end


async def one_rag(http: Any, question: str) -> tuple[float, float]:
    start = time.perf_counter()
    ttft = None
    body = {"question": question}
    async with http.stream("POST", "/apps/rag_chatbot/stream", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"rag failed {response.status_code}: {await response.aread()}")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "error":
                    raise RuntimeError("rag_chatbot stream failed")
            elif line.startswith("data:") and event == "token" and ttft is None:
                ttft = time.perf_counter() - start
    end = time.perf_counter() - start
    return (ttft if ttft is not None else end), end


async def load(url: str, concurrency: int, total: int, send) -> dict[str, float]:
    """`concurrency` clients share `total` requests; the four metrics."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await send(http, 0)  # warm-up: connection, first-request costs
        counter = iter(range(total))
        samples: list[tuple[float, float]] = []

        async def client() -> None:
            for i in counter:
                samples.append(await send(http, i))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = sorted(s[0] for s in samples)
    lats = sorted(s[1] for s in samples)
    return {
        "requests_per_s": total / elapsed,
        "p50_ttft_s": statistics.median(ttfts),
        "p99_ttft_s": _pct(ttfts, 0.99),
        "p99_latency_s": _pct(lats, 0.99),
    }


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def chat_sender(system: str, model: str):
    def body(i: int) -> dict[str, Any]:
        b = {
            "model": model,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": ANSWER_TOKENS,
            "temperature": 0,
            "stream": True,
        }
        if system == "covey":
            b["ignore_eos"] = True
        else:
            b["min_tokens"] = ANSWER_TOKENS
        return b

    return lambda http, i: one_chat(http, body(i))


def run_levels(workload, system, url, levels, size, send, results) -> None:
    for c in levels:
        total = max(size["min_requests"], c * size["rounds"])
        params = {"concurrency": c, "requests": total, "answer_tokens": ANSWER_TOKENS}
        try:
            m = asyncio.run(load(url, c, total, send))
        except Exception as exc:  # a peer that fails at a level is recorded, not dropped
            why = f"the server failed at concurrency {c}: {type(exc).__name__}: {exc}"
            print(f"{workload:8s} {system:9s} c={c:2d}: {why}", flush=True)
            for metric in METRICS:
                results.append(record(workload, system, metric, None, params, why))
            continue
        for metric in METRICS:
            results.append(record(workload, system, metric, m[metric], params))
        print(
            f"{workload:8s} {system:9s} c={c:2d}: {m['requests_per_s']:.2f} req/s, "
            f"p50 TTFT {m['p50_ttft_s']:.3f}s, p99 latency {m['p99_latency_s']:.2f}s",
            flush=True,
        )


def bench_covey(size, results, logs: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "--serve-covey", str(port)]
    proc = start(cmd, f"{url}/readyz", logs / "covey.log")
    try:
        import httpx

        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        send = chat_sender("covey", model)
        run_levels("chat", "covey", url, size["chat_levels"], size, send, results)
        rag = lambda http, i: one_rag(http, QUESTIONS[i % len(QUESTIONS)])  # noqa: E731
        run_levels("rag_chat", "covey", url, size["rag_levels"], size, rag, results)
    finally:
        stop(proc)


def bench_llama_cpp(size, results, logs: Path) -> None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        why = f"llama-cpp-python[server] is not installed ({exc}); make bench installs it"
        for c in size["chat_levels"]:
            for metric in METRICS:
                results.append(record("chat", "llama.cpp", metric, None, {"concurrency": c}, why))
        return
    import torch

    from covey.llm_backend.model_source import resolve_model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(resolve_model(None).path),
        "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096",
        "--n_threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    proc = start(cmd, f"{url}/v1/models", logs / "llama_cpp.log")
    try:
        send = chat_sender("llama.cpp", "smollm2")
        run_levels("chat", "llama.cpp", url, size["chat_levels"], size, send, results)
    finally:
        stop(proc)
    why = "llama.cpp's server has no RAG app; rag_chat is covey's chatbot endpoint only"
    for c in size["rag_levels"]:
        for metric in METRICS:
            results.append(record("rag_chat", "llama.cpp", metric, None, {"concurrency": c}, why))


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, m) for w in ("chat", "rag_chat") for m in ("requests_per_s", "p50_ttft_s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (workload, metric) in zip(axes, panels):
        rows = [r for r in data["results"] if r["workload"] == workload and r["metric"] == metric]
        for system in sorted({r["system"] for r in rows}):
            pts = [(r["params"]["concurrency"], r["value"]) for r in rows if r["system"] == system]
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=system)
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.3g}", (x, y), fontsize=7, ha="center", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xticks(LEVELS, [str(c) for c in LEVELS])
        ax.set_xlabel("concurrent clients")
        better = "higher" if metric == "requests_per_s" else "lower"
        ax.set_title(f"{workload}: {metric} ({better} is better)", fontsize=9)
        ax.legend(fontsize=7)
    env = data["environment"]
    fig.suptitle(
        f"covey server vs llama_cpp.server, {data['model']}, {env['cpu']} x{env['cpu_count']}"
        f"{' (quick)' if data['quick'] else ''}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-covey"]:
        serve_covey(int(argv[1]))
        return 0
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    size = sizes(args.quick)
    logs = Path(tempfile.gettempdir()) / "covey-bench-server"  # the servers' own output
    logs.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    bench_covey(size, results, logs)
    bench_llama_cpp(size, results, logs)
    import torch

    from covey.llm_backend.model_source import EMBEDDED_NAME

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = write_results(args, NAME, results, device, EMBEDDED_NAME)
    c16 = {
        r["system"]: r["value"]
        for r in results
        if r["workload"] == "chat"
        and r["metric"] == "requests_per_s"
        and r["params"].get("concurrency") == 16
    }
    if c16.get("covey") and c16.get("llama.cpp"):
        print(f"chat at concurrency 16: covey / llama.cpp = {c16['covey'] / c16['llama.cpp']:.2f}x")
    plot(data, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    print(json.dumps({"logs": str(logs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
