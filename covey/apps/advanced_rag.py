"""Advanced RAG: expand the question into sub-queries, retrieve for each, fuse, answer.

One question is often worded unlike the passage that answers it. The model rewrites it from
several angles; every rewrite shares the same leading instruction (so the optimizer prefills
it once and forks it) and none depends on another (so they run in parallel), as do the
retrievals that follow. Reciprocal-rank fusion merges the rankings: a chunk that several
queries find rises. One call then answers from the fused passages, citing them.
"""

from __future__ import annotations

import inspect

import covey.graph as cg
from covey.apps.citations import passage_segments
from covey.apps.prompt_subject import reworded
from covey.errors import ConfigError, InvalidRequestError
from covey.graph import App
from covey.graph.dsl import PyFunction
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import Segment
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.retrieval.documents import SearchResult
from covey.retrieval.rank_fusion import RRF_K, reciprocal_rank_fusion
from covey.retrieval.searcher import check_k

ANGLES = (
    "Write it as a search query naming the exact Python keywords, functions or modules.",
    "Write it as a search query about the general concept behind it.",
    "Write it as a search query describing the problem a programmer is trying to solve.",
)
# The same angles for an index of the user's own, which may not be about Python or code.
NEUTRAL_ANGLES = (
    "Write it as a search query naming the exact terms, names or keywords.",
    "Write it as a search query about the general concept behind it.",
    "Write it as a search query describing the problem the asker is trying to solve.",
)
SUBQUERY_MAX_TOKENS = 24
ANSWER_MAX_TOKENS = 64
PER_QUERY_K = 4
TOP_K = 4
# Labels a small model likes to put before its rewrite.
_LABELS = ("query", "search query", "search", "question", "rewritten question")


def rewrite_query(angle: str, question: str):
    """{{#system}}
    You turn a question about Python into one short search query for the Python
    documentation. Reply with the query only, on one line.
    {{#user}}
    {{angle}}
    Question: {{question}}
    {{#assistant}}
    {{gen query}}"""


def answer_from_passages(context: list[Segment], question: str):
    """{{#system}}
    You are a helpful assistant for Python programmers. Answer the question using the
    numbered passages, and cite each passage you use by its number, like [1].
    {{#user}}
    Passages:
    {{context}}

    Question: {{question}}
    {{#assistant}}
    {{gen answer}}"""


rewrite_neutrally = reworded(
    rewrite_query,
    {
        "a question about Python": "a question",
        "for the Python\n    documentation": "for the\n    documents",
    },
)
answer_neutrally = reworded(
    answer_from_passages, {"a helpful assistant for Python programmers": "a helpful assistant"}
)


def clean_query(rewritten: str, question: str) -> str:
    """The rewrite's first non-empty line without quotes or a `Query:`-style label; the
    original question when the model produced nothing usable, since an empty query cannot
    search."""
    for line in rewritten.splitlines():
        text = line.strip().strip("\"'`").strip()
        label, sep, rest = text.partition(":")
        if sep and label.strip().lower() in _LABELS:
            text = rest.strip().strip("\"'`").strip()
        if text:
            return text
    return question


def fuse_rankings(
    rankings: list[list[SearchResult]], k: int, rrf_k: int = RRF_K
) -> list[SearchResult]:
    """The `k` best chunks by reciprocal-rank fusion over `rankings`, one result per chunk id.

    A chunk's fused score replaces its per-query scores (which are not comparable across
    queries); ties keep first-seen order, so the fusion is deterministic.
    """
    k = check_k(k)
    first: dict[str, SearchResult] = {}
    ids: dict[str, int] = {}
    numbered: list[list[int]] = []
    for ranking in rankings:
        row: list[int] = []
        for result in ranking:
            cid = result.chunk.id
            if cid not in ids:
                ids[cid], first[cid] = len(ids), result
            if ids[cid] not in row:
                row.append(ids[cid])
        numbered.append(row)
    by_number = list(first.values())
    fused = reciprocal_rank_fusion(numbered, rrf_k)[:k]
    return [SearchResult(by_number[n].chunk, score) for n, score in fused]


def fusion_node(count: int, k: int) -> PyFunction:
    """A function node taking `count` rankings as inputs `ranking_1..ranking_<count>`.

    The DSL wires each input by name, so a fan-in of a variable number of lists needs that
    many named parameters; this builds the signature the DSL reads.
    """
    names = [f"ranking_{i}" for i in range(1, count + 1)]
    hint = list[SearchResult]

    def fuse_results(**rankings: list[SearchResult]) -> list[SearchResult]:
        return fuse_rankings([rankings[n] for n in names], k)

    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=hint) for n in names]
    signature = inspect.Signature(params, return_annotation=hint)
    fuse_results.__signature__ = signature  # type: ignore[attr-defined]
    fuse_results.__annotations__ = {**dict.fromkeys(names, hint), "return": hint}
    return cg.function(fuse_results)


def build_advanced_rag_app(
    angles: tuple[str, ...] = ANGLES,
    index: str = DEFAULT_INDEX_NAME,
    per_query_k: int = PER_QUERY_K,
    top_k: int = TOP_K,
    subquery_max_tokens: int = SUBQUERY_MAX_TOKENS,
    answer_max_tokens: int = ANSWER_MAX_TOKENS,
    include_question: bool = True,
    mode: str = "hybrid",
    python_docs: bool = True,
) -> App:
    """One rewrite per angle; `include_question` also searches the question as asked (that
    retrieval starts at once, overlapping the rewrites). Outputs `answer`, `results` (the
    fused passages as numbered in the prompt) and `query_1..query_<n>`. Greedy decoding.
    `python_docs=False` words the prompts without naming Python (and, unless `angles` is
    given, uses NEUTRAL_ANGLES), for an index of your own.
    """
    if not python_docs and angles is ANGLES:
        angles = NEUTRAL_ANGLES
    if not angles:
        raise ConfigError("angles must name at least one rewrite")
    try:
        top_k = check_k(top_k)
    except InvalidRequestError as exc:
        raise ConfigError(f"top_k: {exc}") from None
    rewrite = cg.semantic_function(
        rewrite_query if python_docs else rewrite_neutrally,
        params=SamplingParams(max_tokens=subquery_max_tokens, temperature=0.0, stop=("\n",)),
    )
    answer_fn = cg.semantic_function(
        answer_from_passages if python_docs else answer_neutrally,
        params=SamplingParams(max_tokens=answer_max_tokens, temperature=0.0),
    )
    clean, passages = cg.function(clean_query), cg.function(passage_segments)
    fuse = fusion_node(len(angles) + int(include_question), top_k)

    @cg.app(name="advanced_rag")
    def advanced_rag(question: str):
        queries = [clean(rewrite(angle=a, question=question), question=question) for a in angles]
        searched = [question, *queries] if include_question else queries
        rankings = [cg.retrieve(q, k=per_query_k, index=index, mode=mode) for q in searched]
        fused = fuse(**{f"ranking_{i}": r for i, r in enumerate(rankings, start=1)})
        answer = answer_fn(context=passages(fused), question=question)
        named = {f"query_{i}": q for i, q in enumerate(queries, start=1)}
        return {"answer": answer, "results": fused, **named}

    return advanced_rag


advanced_rag_app = build_advanced_rag_app()
