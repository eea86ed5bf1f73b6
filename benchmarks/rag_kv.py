"""RAG KV-reuse benchmark: time to first token and answer accuracy when the retrieved chunks'
KV is reused (exact RAGCache, blended CacheBlend) against full prefill, covey and llama.cpp.

    python benchmarks/rag_kv.py [--quick] [--json PATH] [--plot PATH]

Workload `rag`: a stream of RAG questions, one at a time, over chunks of the default
corpus' text (Python-docs prose from `pydoc_data`, ~256 tokens each) in which
benchmarks/planted_facts.py planted one made-up fact per chunk. Each prompt is the RAG apps'
format (numbered passages as chunk segments in the chat template) with 5 chunks drawn by
Zipf popularity (a few chunks are read often, most rarely, as retrievals over a corpus are),
in a random order, and asks for the fact of one of them; the answer is scored by exact
match (`accuracy`). The first `prime` requests are served but not measured (a server that
has been up for a while); the measured ones report `ttft_s` (mean), `p99_ttft_s` and the
share of prompt tokens whose KV was reused (`reuse_rate`) or came from the prefix cache.

Systems: `covey` (the engine's defaults), `covey-full` (no reuse: chunk cache and prefix
cache off), `covey-prefix-cache` (prefix cache only), `covey-exact`, `covey-blend-R`
(blend with recompute ratio R; R=0 is plain concatenation of the reused KV) and `llama.cpp`
(llama-cpp-python on the same GGUF, full prefill per request: it keeps only the previous
prompt's KV, which a shuffled chunk order defeats anyway, and it is reset per request).
Workload `rag-standalone-kv`: the same measured requests on blend engines whose chunk KV was
first computed standalone (`warm_chunks`, each chunk alone at position 0) instead of taken
from an earlier request's prefill. `-sinkK` systems also recompute the first K tokens of
every reused chunk (`blend_sink_tokens`); `-checkL` systems choose the recomputed tokens on
layer L instead of the default check layer (`blend_check_layers`); `-stored` systems choose
them by the scores stored with each chunk when every reused chunk has some, with no check
layer (`blend_stored_scores`; a blend with an unscored chunk runs the check layer and stores
its scores).

Accuracy is judged against `covey-full` on the same questions (paired): `accuracy_vs_full`
is the difference, with the questions one system answered and the other did not (`lost`,
`won`), the share of questions where both agree, and a 95% interval of the paired
difference. Only the questions whose answers differ add noise: at 64 questions blend 0.15
changed 8 (interval about +-0.085); 160 questions at full size bring that to about +-0.055,
against about +-0.11 for two unpaired accuracies. Target: within 0.02 of `covey-full`,
judged on the interval, not the point estimate (see `verdict`): `ok` only when the whole
interval lies above -0.02, `MISSED` when it lies wholly below, `inconclusive` otherwise.

`--score` (accuracy mode) adds a continuous figure: each question's log-probability of the
right code, scored as a whole-option choice among the prompt's five codes on the same
prefill, paired with covey-full's (`dlogP`, and `dshare` for the share among the codes).
Measured on the first 48 questions (loaded machine; logP is load-independent): ratio 1.0
dlogP -0.014 [-0.042, +0.014] (bf16 noise: the same likeliest code on all 48, per-question
differences up to 0.3), 0.5 -0.035 [-0.23, +0.16], 0.15 -0.092 [-0.33, +0.14], 0 -0.171
[-0.44, +0.10]; chunk KV computed after the shared prompt prefix alone (system, label 1)
instead of taken from a request's prefill: -2.27 [-2.85, -1.70], far worse.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import parse_args, record, write_results

NAME = "rag_kv"
BASELINE = "covey-full"
TARGETS = {"covey-full": 3.0, "llama.cpp": 5.0}  # covey's TTFT at least this many x lower
ACCURACY_MARGIN = 0.02
ZIPF_S = 1.1
MAX_TOKENS = 6


SINKS = 4  # the -sinkK systems' blend_sink_tokens
# The -checkL system's check layer: issue 9's probe found layer 1's deviation a poor guide
# to the deep layers' (where this model's loss is), layer 12's a good one; at ratio 0.15 over
# 160 questions it scored 0.600 against full prefill's 0.600 (layer 1: 0.544, 8: 0.594;
# results/rag_kv_accuracy_check_layers.json). It costs TTFT, as the check layers compute every
# reused token: interleaved A/B on a loaded machine, 0.64x full prefill's TTFT (layer 8:
# 0.56x, layer 1: 0.42x); this system measures it on a quiet one.
DEEP_CHECK = 12


ACCURACY_HELP = (
    " Accuracy-only mode: --accuracy-only [--questions N] [--variant SPEC ...] runs covey-full"
    " and the blend variants (SPEC: ratio=R,check=1-4,score=kv|k|v|attention|kv+attention,"
    "quota=global|per_chunk,sink=K,stored=0|1,host=MiB) on the same questions and prints"
    " the paired table;"
    " --reference JSON... adds the systems of earlier such runs to the table (covey-full's"
    " answers are deterministic: run it once); with no --variant, only the table is printed."
    " --score also|only adds (or runs only) a second pass per system that scores the right"
    " code's log-probability (`answer_logprob`), paired with covey-full's as dlogP: a"
    " continuous figure, far less noisy than exact match, to rank variants on fewer"
    " questions."
)


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"chunks": 20, "prime": 6, "requests": 12, "chars": 1000, "ratios": (0.0, 0.15)}
    return {
        "chunks": 64,
        "prime": 24,
        "requests": 160,
        "chars": 1000,
        "ratios": (0.0, 0.15, 0.3, 0.5),
    }


SPEC_KEYS = {
    "ratio": ("blend_recompute_ratio", float),
    "check": ("blend_check_layers", lambda v: tuple(_layers(v))),
    "score": ("blend_score", str),
    "quota": ("blend_quota", str),
    "sink": ("blend_sink_tokens", int),
    "stored": ("blend_stored_scores", lambda v: _flag(v)),
    "host": ("chunk_store_bytes", lambda v: _mib(v)),  # the host tier, in MiB (defined below)
}


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise SystemExit(f"--variant: stored takes 0 or 1, got {text!r}")
    return text == "1"


def _mib(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise SystemExit(f"--variant: host takes a whole number of MiB >= 1, got {text!r}")
    return int(text) << 20


def _layers(text: str) -> list[int]:
    """"1" -> [1]; "1-4" -> [1, 2, 3, 4]; "1:3" -> [1, 3]."""
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(":")]


def blend_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """A blend system from `key=value,...` (ratio, check, score, quota, sink, stored, host), e.g.
    "ratio=0.15,check=1-4,score=kv+attention,quota=per_chunk"; unset keys keep the
    engine's defaults, except stored (0 unless set). Its name lists what it sets."""
    # stored=0 unless set: the check layers the name gives must run, whatever the default.
    config: dict[str, Any] = {"chunk_cache": "blend", "blend_stored_scores": False}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        if key not in SPEC_KEYS:
            keys = list(SPEC_KEYS)
            raise SystemExit(f"--variant: unknown key {key!r} in {spec!r} (keys: {keys})")
        field, parse = SPEC_KEYS[key]
        config[field] = parse(val)
    return "covey-blend[" + spec + "]", config


def blend(
    ratio: float, sinks: int = 0, check: int | None = None, stored: bool = False
) -> tuple[str, dict[str, Any]]:
    name = f"covey-blend-{ratio:g}" + (f"-sink{sinks}" if sinks else "")
    # blend_stored_scores always set: the name says whether scores are stored, whatever the
    # engine's default.
    config = {
        "chunk_cache": "blend",
        "blend_recompute_ratio": ratio,
        "blend_sink_tokens": sinks,
        "blend_stored_scores": stored,
    }
    if check is not None:
        name += f"-check{check}"
        config["blend_check_layers"] = (check,)
    if stored:
        name += "-stored"
    return name, config


def systems(ratios: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    """System name -> EngineConfig overrides ({} is the engine's defaults); covey-full first,
    the reference of every paired accuracy."""
    from covey.llm_backend.config import EngineConfig

    out: dict[str, dict[str, Any]] = {
        "covey-full": {"chunk_cache": "off", "enable_prefix_caching": False},
        "covey-prefix-cache": {"chunk_cache": "off"},
        "covey-exact": {"chunk_cache": "exact"},
    }
    default_ratio = EngineConfig().blend_recompute_ratio
    for r in ratios:
        out.update([blend(r)])
    out.update([blend(default_ratio, SINKS), blend(default_ratio, check=DEEP_CHECK)])
    out.update([blend(default_ratio, stored=True)])
    return {**out, "covey": {}}  # last: it repeats the run of the system it equals, if any


def workload(size: dict[str, Any], tokenizer: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """(prime questions, measured questions, their prompts as segments)."""
    import planted_facts as pf

    chunks = pf.make_chunks(size["chunks"], size["chars"])
    questions = pf.make_questions(chunks, size["prime"] + size["requests"], zipf_s=ZIPF_S)
    prompts = [pf.prompt(tokenizer, q) for q in questions]
    return questions, prompts, chunks


def serve(engine: Any, prompts: list[Any], progress=None) -> list[Any]:
    """Each prompt alone, in order; its finished RequestOutput. `progress(i, out)` sees each
    as it finishes."""
    from covey.llm_backend.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = []
    for i, p in enumerate(prompts):
        rid = engine.add_request(p, params)
        outs.extend(engine.run_to_completion([rid]))
        if progress is not None:
            progress(i, outs[-1])
    return outs


def serve_scores(engine: Any, prompts: list[Any], questions: list[Any], progress=None) -> list:
    """Each prompt alone, in order, with the question's codes as whole-option choices: the
    same prefill as `serve`'s (the store and caches evolve alike), then each code scored on
    top of it. Returns each question's `planted_facts.AnswerScore`."""
    import planted_facts as pf

    from covey.llm_backend.sampling_params import SamplingParams

    out = []
    for i, (p, q) in enumerate(zip(prompts, questions, strict=True)):
        params = SamplingParams(
            choices=pf.options(q), choice_scoring="whole", length_normalize=False
        )
        rid = engine.add_request(p, params)
        done = engine.run_to_completion([rid])[0]
        out.append(pf.answer_score(done.choice_logprobs, q))
        if progress is not None:
            progress(i, done, out[-1])
    return out


def paired_mean(values: list[float], reference: list[float]) -> dict[str, Any]:
    """The mean paired difference `values - reference` and its 95% normal interval."""
    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return {
        "diff": round(mean, 4),
        "ci95": [round(mean - 1.96 * se, 4), round(mean + 1.96 * se, 4)],
    }


def paired(correct: list[bool], reference: list[bool]) -> dict[str, Any]:
    """`correct` against `reference` on the same questions: the accuracy difference, the
    questions lost and won, agreement, and a 95% normal interval of the paired difference."""
    n = len(correct)
    lost = sum(r and not c for c, r in zip(correct, reference, strict=True))
    won = sum(c and not r for c, r in zip(correct, reference, strict=True))
    diff = (won - lost) / n
    se = math.sqrt(max(0.0, (won + lost) / n - diff**2) / n)
    return {
        "diff": round(diff, 4),
        "lost": lost,
        "won": won,
        "agree": round(1 - (won + lost) / n, 4),
        "ci95": [round(diff - 1.96 * se, 4), round(diff + 1.96 * se, 4)],
    }


def verdict(ci95: list[float], margin: float = ACCURACY_MARGIN) -> str:
    """The accuracy target's verdict from the paired 95% interval: a point estimate inside
    the margin says little when the interval also fits a loss several times the margin.
    (With very few disagreeing questions the normal interval is optimistic, even zero-wide.)"""
    low, high = ci95
    if low >= -margin:
        return "ok"
    if high < -margin:
        return "MISSED"
    return "inconclusive"


def summarize(
    name: str,
    system: str,
    outs: list[Any],
    questions: list[Any],
    extra: dict[str, Any],
    results: list[dict],
    reference: list[bool] | None,
) -> list[bool]:
    """Records the system's figures; returns its per-question correctness."""
    import planted_facts as pf

    ttfts = sorted(o.metrics.ttft for o in outs)
    prompt_tokens = sum(o.metrics.num_prompt_tokens for o in outs)
    correct = [pf.correct(o.text, q) for o, q in zip(outs, questions, strict=True)]
    acc = sum(correct) / len(correct)
    params = {
        **pf.describe(questions),
        "max_tokens": MAX_TOKENS,
        "zipf_s": ZIPF_S,
        "prompt_tokens_mean": round(prompt_tokens / len(outs), 1),
        "reuse_rate": round(sum(o.metrics.num_reused_tokens for o in outs) / prompt_tokens, 4),
        "recomputed_tokens": sum(o.metrics.num_recomputed_tokens for o in outs),
        "prefix_cache_rate": round(
            sum(o.metrics.num_cached_tokens for o in outs) / prompt_tokens, 4
        ),
        "ttfts_s": [round(t, 4) for t in ttfts],
        **extra,
    }
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    results.append(record(name, system, "ttft_s", statistics.mean(ttfts), params))
    results.append(record(name, system, "p99_ttft_s", p99, {}))
    record_accuracy(name, system, correct, reference, results)
    print(
        f"{name:>17} {system:>22}: ttft {statistics.mean(ttfts):.3f} s (p99 {p99:.3f}), "
        f"accuracy {acc:.3f}, reused {params['reuse_rate']:.2f}, "
        f"prefix cache {params['prefix_cache_rate']:.2f}",
        flush=True,
    )
    return correct


def record_accuracy(
    name: str,
    system: str,
    correct: list[bool],
    reference: list[bool] | None,
    results: list[dict],
) -> None:
    """`accuracy` (with each question's result) and, against covey-full, `accuracy_vs_full`."""
    acc = sum(correct) / len(correct)
    results.append(record(name, system, "accuracy", acc, {"correct": [int(c) for c in correct]}))
    if reference is not None:
        vs = paired(correct, reference)
        results.append(record(name, system, "accuracy_vs_full", vs.pop("diff"), vs))


def bench_covey(
    size,
    model,
    questions,
    prompts,
    results,
    chosen=None,
    pair=True,
    after=None,
    log=False,
    score="off",
) -> list[bool]:
    """Every covey system (or the `chosen` ones) on the same requests, paired against the
    first one's (covey-full) when `pair`; returns the first one's per-question results.
    `after(results)` is called after each system (the accuracy mode saves as it goes);
    `log` prints each answer's correctness as it comes (a long run cut short still pairs
    on the questions both systems reached: each answer depends only on those before it).
    `score`: "also" runs each system a second time, on a fresh engine, scoring the right
    code of every question (`answer_logprob`, see `serve_scores`); "only" runs just that."""
    import planted_facts as pf

    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    reference = None
    prime = size["prime"]
    seen: dict[Any, tuple[str, list[Any], dict[str, Any]]] = {}
    table = systems(size["ratios"]) if chosen is None else chosen
    for system, overrides in table.items():
        config = EngineConfig(**overrides)
        if score != "off":
            engine = LLMEngine(config, model=model)
            serve(engine, prompts[:prime])

            def scored(i: int, out: Any, s: Any, system: str = system) -> None:
                if log:
                    print(f"score {system} {i} {s.logprob:.3f} {s.share:.3f}", flush=True)

            scores = serve_scores(engine, prompts[prime:], questions[prime:], scored)
            engine.close()
            results.append(
                record(
                    "rag",
                    system,
                    "answer_logprob",
                    statistics.fmean(s.logprob for s in scores),
                    {
                        "logprob": [round(s.logprob, 4) for s in scores],
                        "share": [round(s.share, 4) for s in scores],
                        "share_mean": round(statistics.fmean(s.share for s in scores), 4),
                        "choice_accuracy": round(statistics.fmean(s.best for s in scores), 4),
                        "questions": len(scores),
                    },
                )
            )
            if after is not None:
                after(results)
            if score == "only":
                continue
        if config in seen:  # `covey` is one of the others: its run is that one's
            same, outs, extra = seen[config]
            extra = {**extra, "same_engine_as": same}
        else:
            engine = LLMEngine(config, model=model)
            serve(engine, prompts[:prime])

            def progress(i: int, out: Any, system: str = system) -> None:
                if log:
                    ok = int(pf.correct(out.text, questions[prime + i]))
                    print(f"answer {system} {i} {ok} {out.metrics.ttft:.4f}", flush=True)

            outs = serve(engine, prompts[prime:], progress)
            extra = {
                "chunk_cache": config.chunk_cache,
                "blend_recompute_ratio": config.blend_recompute_ratio,
                "blend_sink_tokens": config.blend_sink_tokens,
                "blend_check_layers": list(engine.runner.blend_check_layers),
                "blend_score": config.blend_score,
                "blend_quota": config.blend_quota,
                "blend_stored_scores": config.blend_stored_scores,
                # blend runs that ran the check layers (over every reused token, or, partly
                # checked, over the unscored chunks' only), and those that chose by stored
                # scores alone (results before 2026-11-30 10:00 had no partial checks)
                "checked_blends": engine.chunk_planner.counters.checked_blends
                if engine.chunk_planner is not None
                else 0,
                "partly_checked_blends": engine.chunk_planner.counters.partly_checked_blends
                if engine.chunk_planner is not None
                else 0,
                "stored_score_blends": engine.chunk_planner.counters.stored_score_blends
                if engine.chunk_planner is not None
                else 0,
                "prefix_cache": config.enable_prefix_caching,
                "primed_requests": prime,
                "chunk_store": engine.stats().chunk_cache,
            }
            engine.close()
            seen[config] = (system, outs, extra)
        correct = summarize("rag", system, outs, questions[prime:], extra, results, reference)
        reference = reference or (correct if pair else None)
        if after is not None:
            after(results)
    return reference


def bench_standalone(size, model, results, reference) -> None:
    """Blend engines whose chunk KV was first computed alone (warm_chunks), not taken from
    an earlier request's prefill."""
    import planted_facts as pf

    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    default_ratio = EngineConfig().blend_recompute_ratio
    for system, overrides in (blend(0.0), blend(default_ratio), blend(default_ratio, SINKS)):
        engine = LLMEngine(EngineConfig(**overrides), model=model)
        questions, prompts, _ = workload(size, engine.tokenizer)
        measured = questions[size["prime"] :]
        start = time.perf_counter()
        warmed = engine.warm_chunks(
            [s for q in measured for s in pf.chunk_segments(q)], compute=True
        )
        warm_s = time.perf_counter() - start
        outs = serve(engine, prompts[size["prime"] :])
        extra = {"kv_source": "standalone", "warmed_chunks": warmed, "warm_s": round(warm_s, 2)}
        summarize("rag-standalone-kv", system, outs, measured, extra, results, reference)
        engine.close()


def bench_llama_cpp(size, tokenizer, results, reference) -> None:
    import planted_facts as pf

    from covey.runtime.render import to_text

    questions, prompts, _ = workload(size, tokenizer)
    prime = size["prime"]
    names = ("ttft_s", "p99_ttft_s", "accuracy")
    try:
        from llama_cpp import Llama
    except ImportError:
        why = "llama-cpp-python is not installed (make bench installs it)"
        results.extend(record("rag", "llama.cpp", m, None, {}, why) for m in names)
        results.append(record("rag", "llama.cpp", "accuracy_vs_full", None, {}, why))
        return
    import torch

    from covey.llm_backend.model_source import resolve_model

    llm = Llama(
        model_path=str(resolve_model(None).path),
        n_ctx=4096,
        n_batch=512,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )
    ttfts, texts = [], []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(to_text(p))  # the same tokens covey's plain text would give
        llm.reset()
        start = time.perf_counter()
        first, out = None, []
        for n, tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if first is None:
                first = time.perf_counter() - start
            if tok == llm.token_eos():
                break
            out.append(tok)
            if n == MAX_TOKENS:
                break
        if i >= prime:
            ttfts.append(first)
            texts.append(tokenizer.decode(out))
    ttfts.sort()
    measured = questions[prime:]
    correct = [pf.correct(t, q) for t, q in zip(texts, measured, strict=True)]
    acc = sum(correct) / len(correct)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    params = {
        **pf.describe(measured),
        "gguf": "as shipped",
        "ttfts_s": [round(t, 4) for t in ttfts],
    }
    results.append(record("rag", "llama.cpp", "ttft_s", statistics.mean(ttfts), params))
    results.append(record("rag", "llama.cpp", "p99_ttft_s", p99, {}))
    record_accuracy("rag", "llama.cpp", correct, reference, results)
    print(f"{'rag':>17} {'llama.cpp':>20}: ttft {statistics.mean(ttfts):.3f} s, accuracy {acc:.3f}")


def value(results: list[dict], workload: str, system: str, metric: str) -> float | None:
    for r in results:
        if (r["workload"], r["system"], r["metric"]) == (workload, system, metric):
            return r["value"]
    return None


def report(results: list[dict]) -> None:
    covey = value(results, "rag", "covey", "ttft_s")
    full_acc = value(results, "rag", BASELINE, "accuracy")
    for peer, target in TARGETS.items():
        other = value(results, "rag", peer, "ttft_s")
        if covey and other:
            print(f"covey TTFT {other / covey:.2f}x lower than {peer} (target {target}x)")
    if full_acc is not None:
        print(f"covey-full accuracy {full_acc:.3f}; the others paired against it:")
    for r in results:
        if r["metric"] == "accuracy_vs_full" and r["value"] is not None:
            acc = value(results, r["workload"], r["system"], "accuracy")
            p = r["params"]
            ok = verdict(p["ci95"])
            print(
                f"accuracy {r['workload']}/{r['system']}: {acc:.3f} ({r['value']:+.3f} vs full, "
                f"95% [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}], lost {p['lost']} won "
                f"{p['won']}, agree {p['agree']:.2f}; {ok})"
            )


def load_results(path: Path, size: dict[str, Any]) -> list[dict]:
    """The `rag` records of an earlier accuracy-only run over the same questions (greedy
    answers are deterministic, so covey-full's need not be rerun); its pairings dropped
    (the table pairs everything afresh)."""
    import json

    rows = [
        {**r, "params": {**r["params"], "from": str(path)}}
        for r in json.loads(path.read_text())["results"]
        if r["workload"] == "rag" and not r["metric"].endswith("_vs_full")
    ]
    for r in rows:
        counted = r["metric"] in ("ttft_s", "answer_logprob")
        if counted and r["params"]["questions"] != size["requests"]:
            raise SystemExit(f"--reference {path}: not {size['requests']} questions")
    return rows


def accuracy_table(results: list[dict]) -> list[dict]:
    """Prints every system paired against covey-full: exact-match accuracy (difference,
    lost, won, 95% interval, verdict) and, where the system was scored, the mean paired
    difference of the right code's log-probability (`dlogP`) and of its share among the
    prompt's codes (`dshare`), with their 95% intervals; and its TTFT relative to
    covey-full's (from another run when the reference was loaded: relative figures are
    only as steady as the machine's load). Returns the `*_vs_full` records."""
    rag = [r for r in results if r["workload"] == "rag"]
    accs = {r["system"]: r for r in rag if r["metric"] == "accuracy"}
    scores = {r["system"]: r for r in rag if r["metric"] == "answer_logprob"}
    full, full_score = accs.get(BASELINE), scores.get(BASELINE)
    full_ttft = value(results, "rag", BASELINE, "ttft_s")
    print(
        f"{'system':<58} {'acc':>6} {'vs full':>8} {'lost':>4} {'won':>4} "
        f"{'95% interval':>17} {'verdict':>12} {'TTFT/full':>9} {'logP':>7} "
        f"{'dlogP [95%]':>24} {'dshare [95%]':>24}"
    )
    out = []
    for system in dict.fromkeys([*accs, *scores]):
        cells = f"{'':>6} {'':>51}"
        r = accs.get(system)
        if r is not None:
            cells = f"{r['value']:6.3f} {'':>51}"
            if full is not None and system != BASELINE:
                p = paired([bool(c) for c in r["params"]["correct"]], full["params"]["correct"])
                out.append(record("rag", system, "accuracy_vs_full", p.pop("diff"), p))
                ci = f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
                cells = (
                    f"{r['value']:6.3f} {out[-1]['value']:+8.3f} {p['lost']:>4} {p['won']:>4} "
                    f"{ci:>17} {verdict(p['ci95']):>12}"
                )
        ttft = value(results, "rag", system, "ttft_s")
        ratio = f"{ttft / full_ttft:9.2f}" if ttft and full_ttft else f"{'':>9}"
        score = scores.get(system)
        logp = f"{score['value']:7.3f}" if score is not None else f"{'':>7}"
        deltas = ""
        if score is not None and full_score is not None and system != BASELINE:
            sp, fp = score["params"], full_score["params"]
            lp = paired_mean(sp["logprob"], fp["logprob"])
            sh = paired_mean(sp["share"], fp["share"])
            vs = {**lp, "share": sh}
            out.append(record("rag", system, "answer_logprob_vs_full", lp["diff"], vs))
            deltas = " ".join(
                f"{d['diff']:+7.3f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}]" for d in (lp, sh)
            )
        print(f"{system:<58} {cells} {ratio} {logp} {deltas}")
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (f"{r['system']}" + (" (standalone KV)" if r["workload"] != "rag" else ""), r)
        for r in results
        if r["metric"] == "ttft_s" and r["value"] is not None
    ]
    accs = {
        (r["workload"], r["system"]): r["value"] for r in results if r["metric"] == "accuracy"
    }
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    labels = [name for name, _ in rows]
    bars = ax.barh(labels, [r["value"] for _, r in rows])
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xlabel("mean time to first token (s), lower is better")
    ax.invert_yaxis()
    vs_full = {
        (r["workload"], r["system"]): r["value"]
        for r in results
        if r["metric"] == "accuracy_vs_full" and r["value"] is not None
    }
    keys = [(r["workload"], r["system"]) for _, r in rows]
    bars = bx.barh(labels, [accs.get(k) or 0 for k in keys])
    texts = [
        f"{accs.get(k) or 0:.3f}" + (f" ({vs_full[k]:+.3f} vs full)" if k in vs_full else "")
        for k in keys
    ]
    bx.bar_label(bars, labels=texts, fontsize=7)
    bx.set_xlabel("planted-facts accuracy (paired vs covey-full)")
    bx.set_xlim(0, 1.05)
    bx.invert_yaxis()
    fig.suptitle("RAG prompts of 5 chunks (Zipf popularity): KV reuse vs full prefill")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def accuracy_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The accuracy-only mode's options; the rest go to bench_common's parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--accuracy-only", action="store_true")
    parser.add_argument("--questions", type=int, default=None)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--reference", type=Path, nargs="*", default=[])
    parser.add_argument("--score", choices=("off", "also", "only"), default="off")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    extra, rest = accuracy_args(argv)
    args = parse_args(NAME, __doc__.split("\n\n")[0] + ACCURACY_HELP, rest)
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    size = sizes(args.quick)
    if extra.questions is not None:
        size["requests"] = extra.questions
    engine = LLMEngine(EngineConfig())
    questions, prompts, _ = workload(size, engine.tokenizer)
    serve(engine, prompts[:1])  # warm-up: allocator, threads
    results: list[dict] = []
    if extra.accuracy_only or extra.variant or extra.reference:
        if args.json.name == f"{NAME}.json":  # never overwrite the benchmark's own results
            args.json = args.json.with_name(f"{NAME}_accuracy.json")
        runs = extra.variant or ([] if extra.reference else ["full", ""])
        chosen = dict(
            (BASELINE, systems(())[BASELINE]) if v == "full" else blend_variant(v) for v in runs
        )

        def save(rows: list[dict]) -> None:
            write_results(args, NAME + "_accuracy", rows, str(engine.device), engine.model_name)

        bench_covey(
            size, engine.model, questions, prompts, results, chosen, False, save, True, extra.score
        )
        table = results + [r for path in extra.reference for r in load_results(path, size)]
        results.extend(accuracy_table(table))
        save(results)
        return
    reference = bench_covey(size, engine.model, questions, prompts, results)
    bench_standalone(size, engine.model, results, reference)
    bench_llama_cpp(size, engine.tokenizer, results, reference)
    report(results)
    print(f"covey's default chunk_cache: {engine.config.chunk_cache!r}")
    write_results(args, NAME, results, str(engine.device), engine.model_name)
    plot(results, args.plot)


if __name__ == "__main__":
    main()
