"""Retrieval benchmark: embedding throughput (and ingest batching before/after length
bucketing, same texts, same run), the default Python-docs index build (time, size) and its
evaluation (hit@3 per search mode), end-to-end search latency per mode, and faiss flat vs
IVF vs HNSW (build time, query latency p50/p99, recall@10 against exact search) at 10k and
100k chunks, with numpy brute force as a peer.

    python benchmarks/retrieval.py [--quick] [--json PATH] [--plot PATH]

100k real chunks cannot be embedded on a 2-core CPU in a benchmark's time, so the 10k/100k
collections are built from the real embeddings of the real pydoc chunks, each repeated with
small Gaussian perturbations and renormalized; every record's params say so.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import parse_args, record, write_results

NAME = "retrieval"
MODEL = "all-MiniLM-L6-v2"
K = 10
NOISE = 0.02  # per-dimension std of the noise added to each generated vector
QUERIES = [
    "how do I catch an exception and re-raise it",
    "what does the with statement do",
    "difference between is and ==",
    "how are default argument values evaluated",
    "unpacking a list into variables with a star",
    "how does the for loop iterate",
    "what is a generator expression",
    "global and nonlocal variables in nested functions",
    "how do classes define __init__",
    "what happens when assert fails",
    "integer division and modulo operators",
    "string formatting with f-strings",
]


def percentile_s(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def build_pydocs(quick: bool, workdir: str, results: list[dict]):
    """Time the default-corpus build (chunk, embed, index, commit) as a user's first run,
    and its size on disk. --quick builds the evaluation subset (corpus_eval) instead of the
    whole corpus, which takes minutes to embed on a 2-core CPU."""
    from covey.retrieval.corpus_eval import evaluation_subset
    from covey.retrieval.default_corpus import (
        CORPUS_VERSION,
        default_documents,
        ensure_default_index,
        fill_index,
    )
    from covey.retrieval.document_index import DocumentIndex
    from covey.retrieval.embedder import Embedder
    from covey.retrieval.tokenizers import default_tokenizer, tokenizer_name

    embedder, tokenizer = Embedder.load(), default_tokenizer()
    embedder.embed(["warm up the model"])
    root = Path(workdir) / "pydocs"
    start = time.perf_counter()
    if quick:
        docs = evaluation_subset()
        index = DocumentIndex.create(root, embedder=embedder, tokenizer=tokenizer)
        fill_index(index, docs)
    else:
        docs = default_documents()
        index = ensure_default_index(root, progress=False, embedder=embedder, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    current = root / "versions" / index.manifest["version"]
    size = sum(f.stat().st_size for f in current.iterdir() if f.is_file())
    params = {
        "corpus": "evaluation subset" if quick else f"default, version {CORPUS_VERSION}",
        "documents": len(docs),
        "topics": sum("." not in d.source for d in docs),
        "chunks": len(index),
        "tokens": index.manifest["num_tokens"],
        "chunk_tokens": index.chunker.chunk_tokens,
        "overlap_tokens": index.chunker.overlap_tokens,
        "chunk_tokenizer": tokenizer_name(tokenizer),
        "embed_batch": embedder.batch_size,
        "faiss_kind": index.manifest["index"]["kind"],
    }
    results.append(record("pydocs_build", "covey", "build_s", seconds, params))
    results.append(record("pydocs_build", "covey", "index_bytes", size, params))
    return index


def bench_eval(index, results: list[dict]) -> None:
    """hit@3 of the corpus evaluation (covey.retrieval.corpus_eval) per search mode."""
    from covey.retrieval.corpus_eval import QUESTIONS, evaluate, hit_rate

    for mode in ("hybrid", "vector", "bm25"):
        found = evaluate(index, k=3, mode=mode)
        misses = [r.question for r in found if r.rank is None]
        params = {"questions": len(QUESTIONS), "k": 3, "chunks": len(index), "misses": misses}
        results.append(record("pydocs_eval", f"covey-{mode}", "hit_at_3", hit_rate(found), params))
        print(f"  {mode:<6} hit@3 {hit_rate(found):.3f} ({len(misses)} misses)", flush=True)


def bench_embedding(index, n: int, runs: int, results: list[dict]) -> None:
    """Re-embed a sample of real pydoc chunks in `runs` equal parts: chunks/s of the embedder
    alone, the median over parts so a burst of load from another process skews it less."""
    step = max(1, len(index.chunks) // n)
    sample = index.chunks[::step][:n]
    texts = [c.text for c in sample]
    index.embedder.embed(texts[:8])  # warm up at real sequence lengths: not timed
    size = max(1, len(texts) // runs)
    rates = []
    for i in range(0, size * runs, size):
        start = time.perf_counter()
        index.embedder.embed(texts[i : i + size])
        rates.append(size / (time.perf_counter() - start))
    params = {
        "chunks": size * runs,
        "runs": runs,
        "chunks_per_s_each_run": [round(r, 2) for r in rates],
        "mean_chunk_tokens": round(float(np.mean([c.num_tokens for c in sample])), 1),
        "batch_size": index.embedder.batch_size,
        "text": "real pydoc_data.topics chunks",
    }
    results.append(record("embedding", "covey", "chunks_per_s", float(np.median(rates)), params))


def padded_tokens(batches: list[list[int]], counts: list[int]) -> int:
    """Tokens the model computes over: each batch is padded to its longest text."""
    return sum(max(counts[i] for i in batch) * len(batch) for batch in batches)


def bench_batching(embedder, n: int, rounds: int, results: list[dict]) -> None:
    """The ingest embedding path before and after length bucketing, on the same real pydoc
    chunks in document order (the order ingest produces them), rounds alternating which
    goes first. Before: consecutive slices of 256 texts, each sorted by characters and cut
    into 64-text batches by sentence-transformers. After: the window sorted by length
    before slicing, and each slice batched by the embedder's own token counts. Padded
    tokens (what the model computes over) are reported too: unlike chunks/s, load-free."""
    from covey.retrieval.chunker import ChunkerConfig, chunk_document
    from covey.retrieval.default_corpus import pydoc_documents
    from covey.retrieval.document_index import EMBED_BATCH
    from covey.retrieval.length_batching import embed_by_length, length_sorted_slices
    from covey.retrieval.tokenizers import default_tokenizer

    tokenizer, texts = default_tokenizer(), []
    for doc in pydoc_documents():
        texts += [c.text for c in chunk_document(doc, tokenizer, ChunkerConfig())]
        if len(texts) >= n:
            break
    texts = texts[:n]
    counts = embedder.token_counts(texts)
    size = embedder.batch_size

    def before() -> None:
        for i in range(0, len(texts), EMBED_BATCH):
            embedder.model.encode(
                texts[i : i + EMBED_BATCH],
                batch_size=size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

    def after() -> None:
        embed_by_length(embedder.embed, texts, embedder.dimension, EMBED_BATCH)

    before_batches, after_batches = [], []
    for i in range(0, len(texts), EMBED_BATCH):  # sentence-transformers sorts by characters
        rows = sorted(range(i, min(i + EMBED_BATCH, len(texts))), key=lambda j: -len(texts[j]))
        before_batches += [rows[b : b + size] for b in range(0, len(rows), size)]
    for rows in length_sorted_slices([len(t) for t in texts], EMBED_BATCH):
        rows = [int(rows[j]) for j in length_sorted_slices([counts[i] for i in rows], 10**9)[0]]
        after_batches += [rows[b : b + size] for b in range(0, len(rows), size)]
    embedder.embed(texts[:8])  # warm up: not timed
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        order = [("before", before), ("after", after)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            rates[name].append(len(texts) / (time.perf_counter() - start))
    params = {
        "chunks": len(texts),
        "rounds": rounds,
        "text": "real pydoc_data.topics chunks in document order (200-token chunks)",
        "real_tokens": int(sum(counts)),
        "batch_size": size,
        "slice": EMBED_BATCH,
    }
    for name, system, batches in (
        ("before", "doc-order-slices", before_batches),
        ("after", "length-bucketed", after_batches),
    ):
        p = dict(params, chunks_per_s_each_round=[round(x, 2) for x in rates[name]])
        rate = float(np.median(rates[name]))
        results.append(record("embedding_batching", system, "chunks_per_s", rate, p))
        padded = padded_tokens(batches, counts)
        results.append(record("embedding_batching", system, "padded_tokens", padded, params))
        print(f"  {system:<17} {rate:6.1f} chunks/s, {padded} padded tokens", flush=True)


def bench_search_modes(index, repeats: int, results: list[dict]) -> None:
    """End-to-end DocumentIndex.search latency (query embedding included) per mode; modes
    take turns on each query so background load hits them alike."""
    modes = ("vector", "bm25", "hybrid")
    for mode in modes:
        index.search(QUERIES[0], k=5, mode=mode)  # builds faiss/BM25 lazily: not timed
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(repeats):
        for mode in modes:
            start = time.perf_counter()
            index.search(QUERIES[i % len(QUERIES)], k=5, mode=mode)
            samples[mode].append(time.perf_counter() - start)
    params = {"chunks": len(index), "queries": repeats, "k": 5, "corpus": "pydocs"}
    for mode in modes:
        for metric, q in (("p50_latency_s", 50), ("p99_latency_s", 99)):
            value = percentile_s(samples[mode], q)
            results.append(record("search_pydocs", f"covey-{mode}", metric, value, params))


def synthetic(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n unit vectors, each a random convex mix of 3 real embeddings (Dirichlet(1,1,1)
    weights) plus N(0, NOISE^2) noise, renormalized: a continuum between real chunks, so
    neighbours are not trivially separated clusters of near-duplicates."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base), (n, 3))
    weights = rng.dirichlet(np.ones(3), n)  # [n, 3]
    x = np.einsum("nk,nkd->nd", weights, base[picks]) + rng.normal(0, NOISE, (n, base.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def time_queries(search, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    samples, found = [], []
    for q in queries:
        start = time.perf_counter()
        ids = search(q[None, :])
        samples.append(time.perf_counter() - start)
        found.append(ids)
    return samples, np.vstack(found)


def bench_kinds(base: np.ndarray, n: int, n_queries: int, results: list[dict]) -> None:
    """Build each faiss kind over n vectors; single-query latency and recall@10."""
    from covey.retrieval.vector_index import (
        IndexConfig,
        build_index,
        exact_search,
        recall_at_k,
        search_index,
    )

    vectors = synthetic(base, n, seed=n)
    queries = synthetic(base, n_queries, seed=n + 1)  # fresh noise: never indexed
    truth = exact_search(vectors, queries, K)
    config = IndexConfig()
    workload = f"vector_index_{n // 1000}k"
    params = {
        "vectors": n,
        "dim": int(vectors.shape[1]),
        "queries": n_queries,
        "k": K,
        "data": f"generated: Dirichlet(1,1,1) mixes of 3 of the {len(base)} real MiniLM "
        f"embeddings of pydoc chunks + N(0, {NOISE}^2) noise per dimension, renormalized; "
        "queries drawn the same way with another seed (never indexed)",
        "batch": 1,
        "faiss_threads": "1 for calls with < 20 queries (vector_index.SMALL_BATCH)",
    }
    for kind in ("flat", "ivf", "hnsw"):
        start = time.perf_counter()
        index = build_index(vectors, kind, config)
        build_s = time.perf_counter() - start
        samples, found = time_queries(lambda q, ix=index: search_index(ix, q, K)[1], queries)
        p = dict(params, **_kind_params(index, kind, config))
        system = f"covey-{kind}"
        results.append(record(workload, system, "build_s", build_s, p))
        results.append(record(workload, system, "p50_latency_s", percentile_s(samples, 50), p))
        results.append(record(workload, system, "p99_latency_s", percentile_s(samples, 99), p))
        results.append(record(workload, system, "recall_at_10", recall_at_k(found, truth), p))
        p50_ms = percentile_s(samples, 50) * 1e3
        print(
            f"  {n:>7} {kind:<5} build {build_s:7.2f}s  p50 {p50_ms:7.3f} ms"
            f"  recall@10 {recall_at_k(found, truth):.4f}",
            flush=True,
        )
    samples, found = time_queries(lambda q: exact_search(vectors, q, K), queries)
    results.append(record(workload, "numpy", "p50_latency_s", percentile_s(samples, 50), params))
    results.append(record(workload, "numpy", "p99_latency_s", percentile_s(samples, 99), params))
    results.append(record(workload, "numpy", "recall_at_10", recall_at_k(found, truth), params))


def _kind_params(index, kind: str, config) -> dict:
    if kind == "ivf":
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if kind == "hnsw":
        return {
            "M": config.hnsw_m,
            "ef_construction": config.ef_construction,
            "ef_search": config.ef_search,
        }
    return {}


def _plot_pydocs(ax, value, chunks: int) -> None:
    """End-to-end search latency per mode on the pydocs index, build and embedding rates."""
    modes = ["covey-vector", "covey-bm25", "covey-hybrid"]
    p50 = [value("search_pydocs", m, "p50_latency_s") * 1e3 for m in modes]
    p99 = [value("search_pydocs", m, "p99_latency_s") * 1e3 for m in modes]
    bars = ax.bar(
        modes, p50, yerr=[[0] * 3, [b - a for a, b in zip(p50, p99, strict=True)]], capsize=4
    )
    ax.bar_label(bars, fmt="%.2f ms", fontsize=8)
    ax.set_yscale("log")
    build = value("pydocs_build", "covey", "build_s")
    rate = value("embedding", "covey", "chunks_per_s")
    before = value("embedding_batching", "doc-order-slices", "chunks_per_s")
    after = value("embedding_batching", "length-bucketed", "chunks_per_s")
    size = value("pydocs_build", "covey", "index_bytes") / 1e6
    hits = ", ".join(
        f"{m}: {value('pydocs_eval', f'covey-{m}', 'hit_at_3'):.2f}"
        for m in ("hybrid", "vector", "bm25")
    )
    ax.set_title(
        f"pydocs search p50 (whisker p99), {chunks} chunks\n"
        f"build {build:.1f}s, {size:.1f} MB; hit@3 {hits}\n"
        f"embedding {rate:.1f} chunks/s; ingest batching "
        f"{before:.1f} -> {after:.1f} chunks/s (length-bucketed)",
        fontsize=9,
    )


def plot(results: list[dict], path: Path, quick: bool, device: str) -> None:
    """Four panels: index build time, query p50/p99, recall@10, end-to-end search by mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(workload, system, metric):
        for r in results:
            if (r["workload"], r["system"], r["metric"]) == (workload, system, metric):
                return r["value"]
        return None

    sizes = sorted(
        {r["params"]["vectors"] for r in results if r["workload"].startswith("vector_index")}
    )
    systems = ["covey-flat", "covey-ivf", "covey-hnsw", "numpy"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    width = 0.8 / len(systems)
    for ax, metric, label in (
        (axes[0, 0], "build_s", "index build time (s)"),
        (axes[0, 1], "p50_latency_s", "single-query latency p50 (ms); whisker = p99"),
        (axes[1, 0], "recall_at_10", "recall@10 vs exact search"),
    ):
        for j, system in enumerate(systems):
            xs = [i + j * width for i in range(len(sizes))]
            ys = [value(f"vector_index_{n // 1000}k", system, metric) for n in sizes]
            scale = 1e3 if "latency" in metric else 1.0
            ys = [np.nan if y is None else y * scale for y in ys]
            bars = ax.bar(xs, ys, width, label=system)
            if metric == "p50_latency_s":
                p99 = [value(f"vector_index_{n // 1000}k", system, "p99_latency_s") for n in sizes]
                err = [
                    0 if (b is None or np.isnan(y)) else b * 1e3 - y
                    for b, y in zip(p99, ys, strict=True)
                ]
                ax.errorbar(xs, ys, yerr=[[0] * len(err), err], fmt="none", ecolor="black")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(sizes))], [f"{n:,} chunks" for n in sizes]
        )
        ax.set_title(label)
        if metric == "recall_at_10":
            ax.set_ylim(0.8, 1.01)
        if "latency" in metric:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    chunks = next(r["params"]["chunks"] for r in results if r["workload"] == "pydocs_build")
    _plot_pydocs(axes[1, 1], value, chunks)
    fig.suptitle(f"covey retrieval ({'quick' if quick else 'full'}, {device}, {MODEL})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    from covey.retrieval.embedder import default_device

    device = default_device()
    results: list[dict] = []
    what = "the evaluation subset" if args.quick else "the whole default corpus"
    print(f"pydocs build ({what}) ...", flush=True)
    workdir = tempfile.TemporaryDirectory(prefix="covey-bench-")
    index = build_pydocs(args.quick, workdir.name, results)
    print(
        f"  {len(index)} chunks in {results[-2]['value']:.1f}s, "
        f"{results[-1]['value'] / 1e6:.1f} MB",
        flush=True,
    )
    print("corpus evaluation (hit@3) ...", flush=True)
    bench_eval(index, results)
    bench_embedding(index, 64 if args.quick else 256, 2 if args.quick else 4, results)
    print(f"  embedding {results[-1]['value']:.1f} chunks/s", flush=True)
    print("ingest embedding, before/after length bucketing ...", flush=True)
    bench_batching(index.embedder, 320 if args.quick else 2048, 2, results)
    bench_search_modes(index, 24 if args.quick else 120, results)
    for n in (10_000,) if args.quick else (10_000, 100_000):
        bench_kinds(index.vectors, n, 100 if args.quick else 500, results)
    workdir.cleanup()
    write_results(args, NAME, results, device, MODEL)
    plot(results, args.plot, quick=args.quick, device=device)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
