"""What one engine replica tells the router it holds: the router's own units (chain hashes
of 128-character blocks, chunk ids) that are really in its prefix cache and chunk store.

The router keeps a mirror of each replica's cache from its own routing history, which
drifts: the replica evicts what the router's LRU guess keeps, a request fails before its
prefill, another front routed there before this one started. So the replica keeps a
ledger of the prompts it was sent (`record`, cheap: the route key only) and, when asked
for its report, answers in the router's own terms: every unit of a prompt still running
(its blocks are held, or about to be), and of a finished prompt the units whose tokens the
prefix cache still covers and the chunk ids the chunk store still holds. The ledger does
not read the engine's caches itself: it asks the engine one question per report
(`questions`: the token ids of the finished prompts and their chunks), the engine answers
with `cache_report` (`CacheReporter`, on its own thread: leading tokens cached per prompt,
chunks stored, plus its queued prefill and prefill profile for the router's cost model),
and `answer` turns that into units. The router then drops from its mirror what the replica
no longer holds and adds what it holds unknown to the router (`ReplicaRouter.report`).

Text is tokenized once per finished prompt, at report time, off the request's path and
off the engine's thread (`prepare`, all new prompts in one batch: the tokenizer's
offsets cost ~1-3 ms a prompt one at a time on a busy CPU); the engine then only walks
the prefix trie, ~40 us per prompt of 600 tokens. A unit's tokens end at the last token
that ends within its characters (the tokenizer's offsets), so a unit counts as held only
if every token of it is cached. The engine's walk is read-only: asking what is cached
must not make it recently used, or the report would decide what the prefix cache evicts.
The ledger keeps the `max_prompts` most recent finished prompts (plus those still
running, which are held anyway): older ones drop out of the report, and the router keeps
them only until its own LRU evicts them.

The replica's loop records calls while a report is in flight, so the ledger's bookkeeping
is under one lock; a report works on a snapshot, and an entry is only dropped if it is
still finished when the lock is taken again.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from covey.server.replica_router import BLOCK_CHARS, RouteKey, route_key, route_pieces

MAX_PROMPTS = 256


@dataclass
class _Prompt:
    prompt: Any
    key: RouteKey
    running: int = 0  # calls of this prompt still running at the replica
    # Filled in (one assignment: `prepare` runs on another thread) once it is tokenized:
    # ((chain hash, chars, token end) per unit, the prompt's token ids, (chunk id, chars,
    # chunk token ids) per chunk); () when it cannot be (the engine refused it too).
    tokens: tuple[Any, ...] | None = None


@dataclass
class LedgerQuestions:
    """One report's questions to the engine (`ReplicaCacheLedger.questions`)."""

    snapshot: list[tuple[str, _Prompt, int]]  # (name, entry, calls running) per prompt
    prompts: list[list[int]]  # token ids of each finished prompt to look up, in order
    chunks: list[list[int]]  # token ids of each of their chunks, in order


class ReplicaCacheLedger:
    """The prompts one replica was sent, and which of their units it still holds."""

    def __init__(self, tokenizer: Any, max_prompts: int = MAX_PROMPTS) -> None:
        self.tokenizer = tokenizer  # covey's Tokenizer (None: token-id prompts only)
        self.max_prompts = max_prompts
        self._prompts: OrderedDict[str, _Prompt] = OrderedDict()  # full-chain hash -> prompt
        self._tickets = itertools.count()
        self._running: dict[int, str] = {}  # ticket -> prompt
        self._lock = threading.Lock()  # calls are recorded while a report is in flight

    def __len__(self) -> int:
        return len(self._prompts)

    def record(self, prompt: Any) -> int:
        """A call with `prompt` starts; returns the ticket to pass to `finished`. A prompt
        the router could not key (the engine will refuse it too) is not recorded."""
        ticket = next(self._tickets)
        try:
            key = route_key(prompt)
        except Exception:
            return ticket
        if not key.units:
            return ticket
        name = key.units[-1][0]
        with self._lock:
            entry = self._prompts.get(name)
            if entry is None:
                entry = self._prompts[name] = _Prompt(prompt, key)
            self._prompts.move_to_end(name)
            entry.running += 1
            self._running[ticket] = name
            self._evict()
        return ticket

    def _evict(self) -> None:
        """Drop the oldest finished prompts past `max_prompts`. A running one is skipped,
        never dropped (its blocks are held), and never stops the eviction behind it: one
        long or paused call must not let the ledger grow without bound."""
        excess = len(self._prompts) - self.max_prompts
        if excess <= 0:
            return
        old = [n for n, e in itertools.islice(self._prompts.items(), excess + len(self._running))
               if not e.running][:excess]
        for name in old:
            del self._prompts[name]

    def finished(self, ticket: int) -> None:
        with self._lock:
            name = self._running.pop(ticket, None)
            entry = self._prompts.get(name) if name is not None else None
            if entry is not None and entry.running > 0:
                entry.running -= 1
            self._evict()

    def questions(self) -> LedgerQuestions:
        """What to ask the engine (`CacheReporter.cache_report`): the token ids of every
        finished prompt and of its chunks. A snapshot: on CUDA the report runs while calls
        are recorded."""
        with self._lock:
            snapshot = [(name, entry, entry.running) for name, entry in self._prompts.items()]
        prompts: list[list[int]] = []
        chunks: list[list[int]] = []
        for _, entry, running in snapshot:
            if running:
                continue
            if entry.tokens is None:
                self._tokenize([entry])  # finished since `prepare`
            if entry.tokens:
                _, ids, key_chunks = entry.tokens
                prompts.append(ids)
                chunks.extend(list(c[2]) for c in key_chunks)
        return LedgerQuestions(snapshot, prompts, chunks)

    def answer(
        self,
        asked: LedgerQuestions,
        cached: Sequence[int],
        stored: Sequence[bool] | None,
    ) -> tuple[dict[str, int], dict[str, int]]:
        """(unit hash -> characters, chunk id -> characters) held, from the engine's answer
        to `asked`: `cached[i]` leading tokens of its i-th prompt are in the prefix cache,
        `stored[j]` whether the chunk store holds its j-th chunk (None: no store). Prompts
        of which nothing is left stop being asked about."""
        units: dict[str, int] = {}
        chunks: dict[str, int] = {}
        gone: list[str] = []
        cached_of, stored_of = iter(cached), iter(stored or ())
        for name, entry, running in asked.snapshot:
            if running:
                units.update(entry.key.units)
                if stored is not None:
                    chunks.update((c, n) for c, n, _ in entry.key.chunks)
                continue
            if not entry.tokens:
                gone.append(name)
                continue
            key_units, ids, key_chunks = entry.tokens
            tokens = next(cached_of)
            for h, n, end in key_units:
                if end > tokens:
                    break
                units[h] = n
            kept = [c for c in key_chunks if stored is not None and next(stored_of)]
            chunks.update((c, n) for c, n, _ in kept)
            if (not key_units or key_units[0][2] > tokens) and not kept:
                gone.append(name)  # nothing of it is left: stop checking it
        with self._lock:  # only what is still finished: `record` may have revived it
            for name in gone:
                entry = self._prompts.get(name)
                if entry is not None and not entry.running and entry.tokens is not None:
                    del self._prompts[name]
        return units, chunks

    def pending(self) -> list[_Prompt]:
        """The finished prompts not tokenized yet, to `prepare` (on a worker thread: the
        replica does, `EngineReplica._questions`)."""
        with self._lock:
            return [e for e in self._prompts.values() if e.tokens is None and not e.running]

    def prepare(self, entries: list[_Prompt]) -> None:
        """Tokenize `entries` (from `pending`) in one batch; safe off the engine's thread."""
        self._tokenize(entries)

    def _tokenize(self, entries: list[_Prompt]) -> None:
        """Set each entry's `tokens`: its token ids and each unit's token end. An entry
        already tokenized (by an overlapping report) is skipped, never overwritten: its
        prompt may be gone already (None), which must not read as "cannot be tokenized"."""
        entries = [e for e in entries if e.tokens is None]
        pieces = []
        for entry in entries:
            prompt = entry.prompt  # read once: another thread may clear it once it is done
            if entry.tokens is not None or prompt is None:
                pieces.append(False)
                continue
            try:
                pieces.append(route_pieces(prompt))
            except Exception:
                pieces.append(None)
        texts = [src for ps in pieces if ps for _, _, src in ps if isinstance(src, str)]
        encoded = iter(self._encode(texts))
        for entry, entry_pieces in zip(entries, pieces):
            if entry_pieces is False:
                continue
            if entry_pieces is None:
                if entry.tokens is None:
                    entry.tokens = ()
                continue
            toks = [next(encoded) if isinstance(src, str) else _digits(src)
                    for _, _, src in entry_pieces]
            tokens = self._place(entry.key, entry_pieces, toks)
            if entry.tokens is None:
                entry.tokens = tokens
            entry.prompt = None  # the ids are all the report needs from now on

    @staticmethod
    def _place(key: RouteKey, pieces: list[Any], toks: list[Any]) -> tuple[Any, ...]:
        if any(t is None for t in toks):
            return ()
        units: list[tuple[str, int, int]] = []
        ids: list[int] = []
        chunks: list[tuple[str, int, tuple[int, ...]]] = []
        key_units = iter(key.units)
        for (text, chunk, _), (piece, ends) in zip(pieces, toks):
            base = len(ids)
            ids.extend(piece)
            if chunk is not None:
                h, n = next(key_units)
                units.append((h, n, len(ids)))
                chunks.append((chunk, n, tuple(piece)))
                continue
            for start in range(0, len(text), BLOCK_CHARS):
                h, n = next(key_units)
                units.append((h, n, base + bisect.bisect_right(ends, start + n)))
        return units, ids, chunks

    def _encode(self, texts: list[str]) -> list[tuple[list[int], list[int]] | None]:
        """Per text: its token ids and, per token, the character offset where it ends."""
        if not texts:
            return []
        if self.tokenizer is None:
            return [None] * len(texts)
        try:
            enc = self.tokenizer.hf(texts, add_special_tokens=False, return_offsets_mapping=True)
        except Exception:  # one bad text (the engine refused it too): the others one by one
            return [self._encode([t])[0] if len(texts) > 1 else None for t in texts]
        return [
            (list(ids), [end for _, end in offsets])
            for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])
        ]


def _digits(token_ids: list[int]) -> tuple[list[int], list[int]]:
    """Token ids and where each ends in the text their key hashed: digits and spaces."""
    ends, pos = [], 0
    for t in token_ids:
        pos += len(str(t))
        ends.append(pos)
        pos += 1
    return list(token_ids), ends
