"""Planted facts: a deterministic question set for measuring what chunk KV reuse costs in
answer quality.

Each chunk is a stretch of the Python docs (the default corpus' text, `pydoc_data`) with
one made-up fact planted at a sentence boundary: "The access code of Project Falcon is
4821." Every fact names a distinct project and a random four-digit code, so the model cannot
know it beforehand and no two chunks answer the same question. A question takes five chunks,
asks for the code of the fact in one of them, and the answer is scored by exact match of
the first number the model writes. The chunks are shuffled per question, so a chunk whose
KV was computed in one prompt is reused at other positions, after other chunks.

The prompt is the RAG apps' own format (`covey.apps.citations.passage_segments` inside the
model's chat template), with the answer's first words already in the assistant turn so a
135M model answers in a few tokens. Used by tests/llm_backend/test_chunk_quality.py and
benchmarks/rag_kv.py; nothing here is timed. Besides exact match, `answer_score` gives each
question a continuous figure: the log-probability of the right code (scored as a choice
among the prompt's five codes, see `options`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

from covey.apps.citations import passage_segments
from covey.llm_backend.engine_client import ChatTokenizer
from covey.llm_backend.segments import Segment
from covey.retrieval.documents import Chunk, SearchResult, content_hash
from covey.runtime.render import Context

PER_PROMPT = 5
SYSTEM = (
    "You answer questions using the numbered passages. Copy the exact number the passages "
    "give."
)
NAMES = (
    "Falcon Juniper Cobalt Meridian Saffron Tundra Quasar Harbor Lantern Orchid Granite "
    "Velvet Summit Ember Willow Nimbus Citadel Coral Dune Beacon Thistle Aurora Basalt "
    "Cascade Fjord Gazelle Halcyon Indigo Jasper Kestrel Lotus Magnet Nectar Onyx Pelican "
    "Quartz Raven Sequoia Topaz Umber Vortex Walnut Yarrow Zephyr Acorn Bramble Cedar Delta "
    "Egret Fennel Glacier Hazel Iris Jackal Kiwi Lilac Maple Nova Oasis Pine Quill Ripple "
    "Sable Tulip Urchin Violet Wren Yucca Zinnia Anchor Bison Comet Dahlia Elm Flint Garnet "
    "Heron Ibis Jade Koala Lynx Marlin Newt Otter Panda Quince Robin Swift Tiger Upland Viper"
).split()
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Fact:
    name: str
    code: str

    @property
    def sentence(self) -> str:
        return f"The access code of Project {self.name} is {self.code}."

    @property
    def question(self) -> str:
        return f"What is the access code of Project {self.name}?"

    @property
    def answer_start(self) -> str:
        """The assistant turn's first words: the model continues with the number."""
        return f"The access code of Project {self.name} is"


@dataclass(frozen=True)
class FactChunk:
    result: SearchResult  # the chunk as a retrieval would return it
    fact: Fact


@dataclass(frozen=True)
class Question:
    chunks: tuple[FactChunk, ...]  # in prompt order
    target: int  # which of them holds the fact asked about

    @property
    def fact(self) -> Fact:
        return self.chunks[self.target].fact


def _paragraphs() -> list[str]:
    """Prose paragraphs of the Python docs, topics in a fixed order, each on one line: no
    code, lists or footnotes (their `[1]` would read like a passage number)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            flat = " ".join(para.split())
            if len(flat) > 120 and not para.startswith((" ", "*")) and "[" not in flat:
                out.append(flat)
    return out


def make_chunks(count: int, chars: int = 1000, seed: int = 0) -> list[FactChunk]:
    """`count` chunks of about `chars` characters (~chars/4 tokens), each with its own fact."""
    if count > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} chunks (one project name each), got {count}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, count)
    paragraphs = iter(_paragraphs())
    out: list[FactChunk] = []
    for name in names:
        sentences: list[str] = []
        while sum(len(x) + 1 for x in sentences) < chars:
            sentences += re.split(r"(?<=\.) (?=[A-Z])", next(paragraphs))
        while len(sentences) > 1 and sum(len(x) + 1 for x in sentences) > chars * 1.1:
            sentences.pop()
        fact = Fact(name, str(rng.randrange(1000, 10000)))
        sentences.insert(rng.randrange(len(sentences) + 1), fact.sentence)
        body = " ".join(sentences)
        chunk = Chunk(content_hash(body), body, f"facts:{name.lower()}", 0, len(body), 0)
        out.append(FactChunk(SearchResult(chunk, 1.0), fact))
    return out


def zipf_weights(count: int, s: float) -> list[float]:
    return [1.0 / (rank**s) for rank in range(1, count + 1)]


def make_questions(
    chunks: list[FactChunk],
    count: int,
    seed: int = 0,
    zipf_s: float | None = None,
    per_prompt: int = PER_PROMPT,
) -> list[Question]:
    """`count` questions, each over `per_prompt` distinct chunks in a random order, asking
    about one of them. Chunks are drawn uniformly, or by Zipf popularity (`zipf_s`: chunk i
    drawn with weight 1/(i+1)^s), as a retriever's hits over a corpus are."""
    rng = random.Random(seed)
    weights = zipf_weights(len(chunks), zipf_s) if zipf_s else [1.0] * len(chunks)
    out: list[Question] = []
    for _ in range(count):
        picked: list[int] = []
        while len(picked) < per_prompt:
            i = rng.choices(range(len(chunks)), weights)[0]
            if i not in picked:
                picked.append(i)
        out.append(Question(tuple(chunks[i] for i in picked), rng.randrange(per_prompt)))
    return out


def reordered(question: Question, seed: int) -> Question:
    """The same question with its chunks in another order (the fact's chunk moves too)."""
    rng = random.Random(seed)
    order = list(range(len(question.chunks)))
    while len(order) > 1 and order == sorted(order):
        rng.shuffle(order)
    return Question(tuple(question.chunks[i] for i in order), order.index(question.target))


def prompt(tokenizer: ChatTokenizer, question: Question) -> list[Segment]:
    """The RAG apps' prompt for `question`: chunks as chunk segments in the chat template."""
    ctx = Context(tokenizer, uses_roles=True)
    ctx.add_text("system", SYSTEM)
    ctx.add_text("user", "Passages:\n")
    for piece in passage_segments([c.result for c in question.chunks]):
        ctx.add_piece("user", piece)
    ctx.add_text("user", f"\n\nQuestion: {question.fact.question}", kind="dynamic")
    ctx.add_text("assistant", question.fact.answer_start, kind="dynamic")
    out = ctx.prompt()
    if not isinstance(out, list):
        raise ValueError("the model's chat template could not be split into segments")
    return out


def chunk_segments(question: Question) -> list[Segment]:
    """The question's chunk segments, as `warm_chunks` takes them."""
    return [s for s in passage_segments([c.result for c in question.chunks]) if s.kind == "chunk"]


def correct(output: str, question: Question) -> bool:
    """Exact match: the first number in the output is the fact's code."""
    found = _NUMBER.search(output)
    return found is not None and found.group() == question.fact.code


def options(question: Question) -> tuple[str, ...]:
    """The codes of the question's chunks, each as the continuation of the answer's first
    words (" 4821"), distinct, the asked-for one first: what `answer_scores` scores."""
    out = [" " + question.fact.code]
    for chunk in question.chunks:
        code = " " + chunk.fact.code
        if code not in out:
            out.append(code)
    return tuple(out)


@dataclass(frozen=True)
class AnswerScore:
    """How much the model believes the right code, a continuous figure far less noisy than
    one exact-match answer: `logprob` is log P(right code | prompt) (summed over its
    tokens); `share` is its log-probability among the prompt's codes only (log-softmax over
    them), which ignores how sure the model is that a code comes at all; `best`: whether
    the right code is the likeliest of them."""

    logprob: float
    share: float
    best: bool


def answer_score(choice_logprobs: dict[str, float], question: Question) -> AnswerScore:
    """`choice_logprobs` of a request whose choices were `options(question)`."""
    right = choice_logprobs[" " + question.fact.code]
    values = list(choice_logprobs.values())
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return AnswerScore(right, right - total, right >= top)


def accuracy(outputs: list[str], questions: list[Question]) -> float:
    return sum(correct(o, q) for o, q in zip(outputs, questions, strict=True)) / len(questions)


def describe(questions: list[Question]) -> dict[str, Any]:
    return {
        "questions": len(questions),
        "chunks_per_prompt": len(questions[0].chunks) if questions else 0,
        "distinct_chunks": len({c.result.chunk.id for q in questions for c in q.chunks}),
    }
