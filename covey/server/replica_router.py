"""Which engine replica an LLM call goes to: the one most likely to hold its KV.

Pure policy, no Ray: `RayEngine` asks it per call, `benchmarks/scale.py` replays traces
through it at hundreds of replicas, and its tests need no cluster.

A prompt becomes a `RouteKey`, a chain of hashed units in prompt order: each static or
dynamic segment cut into blocks of `BLOCK_CHARS` characters, each chunk segment one unit
named by its chunk id. Unit i's hash covers units 0..i, so a replica that holds unit i
holds the whole prefix before it, as a KV prefix cache does. The router keeps, per replica,
the chain hashes it sent there (an approximate mirror of its prefix cache, as SGLang's
cache-aware router keeps a radix tree per worker) in LRU order, capped at the replica's KV
capacity; and the chunk ids it sent there, since a chunk store can reuse a chunk's KV at
another position (blend mode) or load it from a lower tier. Each replica's report corrects
that mirror (`report(held=...)`): the replica says, in these same units, which prefixes
its prefix cache and which chunks its chunk store still hold (`replica_cache_report.py`),
and the router drops what it no longer holds and adds what it holds unknown to the router.
A dead replica's entries are forgotten (`forget`).

A replica's score is the characters of KV it should already hold for this call, in the
order the issue asks for: the leading static prefix (the apps' pinned prompts), then the
chunk segments after it, then the session's history; which all fall out of one longest
prefix match, plus half the characters of chunks it holds out of order (position-free
reuse costs a recompute fraction, or only saves a lower tier load). A pin key ("app:..."
or "session:...") stays on the replica that took it, so a re-pin, an unpin and the
session's next turn all go there.

Among the replicas, the call goes to the one whose first token should come soonest, as
Preble, SGLang's cache-aware router and Llumnix weigh it: a replica's estimated time to
first token is (the prefill tokens already queued or running there + this call's tokens
it does not hold + the cached tokens that miss would evict, which later calls would have
hit) x its per-token prefill cost + its fixed per-prefill cost x (its calls in flight + 1).
What a miss evicts is the part of it beyond the free room the replica last reported, less
the prefill queued there, which takes that room first (or, before any report, beyond the
mirror's room). A long cached prefix on a busy replica still
wins when the prefill it saves outweighs the queue ahead of it; a queue of long uncached
prompts loses to an idle replica that must recompute. The queued tokens are the larger of
the router's own count (the uncached tokens of its calls there whose first output has not
come back) and the replica's report (the engine's `cache_report`, less the router's calls
whose first output came back after the report was asked for), which also brings its
measured prefill profile; a replica not heard from yet costs as the others do.
`max_imbalance` stays as a safety cap: a replica more than that many requests deeper than
the least-loaded one is not a candidate at all. The decision is `affinity` when the call
goes to its best cache match, `fallback` when a cheaper replica holding less of it wins,
`balance` when nothing matched anywhere. A call matched nowhere starts a prefix that its
later calls will follow, so it is placed for them: among the replicas not far costlier
than the cheapest, on the one with the least of the router's recent working set
(`ReplicaView.hot_chars`), lest the replica idle at each new prefix's first call collect
more of them than its cache holds. `round_robin` and `pow2` (two random replicas,
the shorter queue: Ray Serve's default algorithm) ignore the cache, for comparison.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from covey.errors import ConfigError, EngineUnavailableError, InvalidRequestError

BLOCK_CHARS = 128  # about 32 tokens: coarse enough to keep the mirror small
CHUNK_OUT_OF_ORDER_WEIGHT = 0.5
# The mirror counts characters, a replica's KV pool tokens; the router's usual guess.
CHARS_PER_TOKEN = 4
Policy = Literal["cache_aware", "round_robin", "pow2"]
POLICIES: tuple[str, ...] = ("cache_aware", "round_robin", "pow2")
Decision = Literal["affinity", "fallback", "balance", "round_robin", "pow2", "pin"]
# A replica's per-token prefill cost before its first report: only ever compared with the
# same guess elsewhere, or with the mean of the replicas that did report.
DEFAULT_PER_TOKEN_S = 1e-3
# A miss on a full cache evicts as much as it adds: prefixes other calls would have hit,
# to be recomputed later (Preble's eviction term). Counted at this weight.
EVICTION_WEIGHT = 1.0
# Prefill ends remembered per replica to correct reports in flight: far more than the calls
# that end while one report is in transit.
PREFILL_ENDED_KEPT = 256
# When one replica's estimated TTFT is "far" above another's (`ReplicaRouter._far_above`):
# by more than this many times it, as well as by more than the call's own full prefill (as
# SGLang's cache-aware router balances only past both an absolute and a relative gap).
BALANCE_RATIO = 1.5


@dataclass(frozen=True)
class RouteKey:
    """What the router knows of one call's prompt: its prefix chain and its chunks."""

    units: tuple[tuple[str, int], ...]  # (chain hash, characters) in prompt order
    chunks: tuple[tuple[str, int, int], ...] = ()  # (chunk id, characters, unit index)
    pin: str | None = None

    @cached_property
    def chars(self) -> int:
        return sum(n for _, n in self.units)


def _blocks(text: str) -> Iterable[str]:
    for start in range(0, len(text), BLOCK_CHARS):
        yield text[start : start + BLOCK_CHARS]


def route_pieces(prompt: Any) -> list[tuple[str, str | None, Any]]:
    """A prompt's pieces in order, each (text the key hashes, chunk id or None, what the
    engine tokenizes: the text, or the token ids the text spells): a str, a list of token
    ids, or a list of segments (anything with `text`, `token_ids`, `kind` and `chunk_id`,
    like `covey...segments.Segment`)."""
    if isinstance(prompt, str):
        return [(prompt, None, prompt)]
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return [(" ".join(map(str, prompt)), None, list(prompt))]  # blocks of their digits
    if isinstance(prompt, (list, tuple)):
        pieces: list[tuple[str, str | None, Any]] = []
        for seg in prompt:
            source = seg.text if seg.text is not None else list(seg.token_ids)
            text = source if isinstance(source, str) else " ".join(map(str, source))
            chunk = (seg.chunk_id or "#" + _digest(text)) if seg.kind == "chunk" else None
            pieces.append((text, chunk, source))
        return pieces
    raise InvalidRequestError(
        f"a prompt must be a str, a list of token ids or a list of Segments, got "
        f"{type(prompt).__name__}"
    )


def route_key(prompt: Any, pin: str | None = None) -> RouteKey:
    """The key of a prompt (see `route_pieces` for what a prompt may be)."""
    units: list[tuple[str, int]] = []
    chunks: list[tuple[str, int, int]] = []
    chain = hashlib.blake2b(digest_size=8)
    for text, chunk, _ in route_pieces(prompt):
        if chunk is not None:
            chunks.append((chunk, len(text), len(units)))
            chain.update(b"\x00chunk:" + chunk.encode())
            units.append((chain.hexdigest(), len(text)))
            continue
        for block in _blocks(text):
            chain.update(block.encode())
            units.append((chain.hexdigest(), len(block)))
    return RouteKey(tuple(units), tuple(chunks), pin)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class ReplicaView:
    """What the router believes one replica holds, and its load."""

    name: str
    capacity_chars: int
    prefixes: OrderedDict[str, int] = field(default_factory=OrderedDict)  # hash -> chars, LRU
    chunks: OrderedDict[str, int] = field(default_factory=OrderedDict)  # chunk id -> chars
    held_chars: int = 0
    chunk_chars: int = 0
    in_flight: int = 0  # calls sent and not finished (the router's own count)
    reported_queue: int = 0  # waiting + running, as the replica last reported
    pins: set[str] = field(default_factory=set)
    # The router's sequence number at its last change to `pins` here (a pin routed, settled
    # or dropped): a report that started before it is stale about pins (see `report`).
    pin_seq: int = 0
    pinning: set[str] = field(default_factory=set)  # pins routed here, prefill still running
    # The router's sequence number when each entry (unit hash, "chunk:" + chunk id) was
    # last routed here or reported: a report asked for before it cannot have seen it.
    stamps: dict[str, int] = field(default_factory=dict)
    # Calls routed here and not done (`ReplicaRouter.call_done`), stamp -> route key: the
    # replica may not have seen them yet (in transit), so a report must not drop what they
    # bring. Only that: one long or paused call must not freeze the rest of the mirror.
    open_calls: dict[int, RouteKey] = field(default_factory=dict)
    # The router's sequence number when it last forgot this replica (it died or was
    # replaced): a report asked for before then speaks for the dead process.
    forgot_seq: int = 0
    # The router's inverted index (unit hash or chunk id -> replicas holding it), shared by
    # every view and kept in step here, so a call is scored only on candidate replicas.
    index: dict[str, set[str]] = field(default_factory=dict)
    # The cost model's inputs (see the module's docstring): per call routed here whose
    # first output has not come back, the prompt tokens it was not believed to hold;
    # and, from the replica's last report, its queued prefill tokens and prefill profile.
    prefilling: dict[int, int] = field(default_factory=dict)
    prefilling_tokens: int = 0
    reported_prefill_tokens: int = 0
    # The sequence number the last report applied to `reported_prefill_tokens` was asked
    # for at, and (sequence number, tokens) of the calls whose prefill ended since: a
    # report counts a call until its first output, so what ended after the report was
    # asked for comes off its figure (or a stale report keeps a drained replica busy).
    prefill_report_seq: int = 0
    prefill_ended: list[tuple[int, int]] = field(default_factory=list)
    per_token_s: float | None = None
    fixed_s: float = 0.0
    free_tokens: int | None = None  # its KV pool's free room, as last reported
    # This replica's share of the router's recent routing (`ReplicaRouter._note_routed`):
    # the characters of the distinct units routed here within the cluster's cache horizon.
    hot_chars: int = 0

    @property
    def load(self) -> int:
        return max(self.in_flight, self.reported_queue)

    @property
    def queued_prefill_tokens(self) -> int:
        return max(self.prefilling_tokens, self.reported_prefill_tokens)

    def prefill_done(self, stamp: int, seq: int) -> None:
        tokens = self.prefilling.pop(stamp, 0)
        if tokens:
            self.prefilling_tokens -= tokens
            self.reported_prefill_tokens = max(self.reported_prefill_tokens - tokens, 0)
            self.prefill_ended.append((seq, tokens))
            del self.prefill_ended[:-PREFILL_ENDED_KEPT]

    def reported_prefill(self, tokens: int, seq: int | None) -> None:
        """A report's queued prefill `tokens`, asked for at `seq`, less the calls whose
        prefill ended after that; a report older than the one applied last is ignored."""
        if seq is None:
            self.reported_prefill_tokens = tokens
            self.prefill_ended.clear()
            return
        if seq < self.prefill_report_seq:
            return
        ended_since = sum(n for s, n in self.prefill_ended if s > seq)
        self.reported_prefill_tokens = max(tokens - ended_since, 0)
        self.prefill_report_seq = seq
        self.prefill_ended = [(s, n) for s, n in self.prefill_ended if s > seq]

    def matched_units(self, key: RouteKey) -> tuple[int, int]:
        """(units, characters) of the key's leading chain this replica holds."""
        units = chars = 0
        for h, n in key.units:
            if h not in self.prefixes:
                break
            units += 1
            chars += n
        return units, chars

    def score(self, key: RouteKey) -> float:
        """Characters of this call's KV believed held here: the matched prefix, plus half
        of each chunk held here that lies past it."""
        units, chars = self.matched_units(key)
        extra = sum(n for chunk, n, unit in key.chunks if unit >= units and chunk in self.chunks)
        return chars + CHUNK_OUT_OF_ORDER_WEIGHT * extra

    def remember(self, key: RouteKey, stamp: int = 0) -> None:
        """The call ran here: its prefix and chunks are (about to be) cached here."""
        for h, n in key.units:
            self._add_unit(h, n, stamp)
        for chunk, n, _ in key.chunks:
            self._add_chunk(chunk, n, stamp)
        self.evict()

    def _add_unit(self, h: str, n: int, stamp: int) -> None:
        if h in self.prefixes:
            self.prefixes.move_to_end(h)
        else:
            self.prefixes[h] = n
            self.held_chars += n
            self.index.setdefault(h, set()).add(self.name)
        self.stamps[h] = stamp

    def _add_chunk(self, chunk: str, n: int, stamp: int) -> None:
        if chunk in self.chunks:
            self.chunks.move_to_end(chunk)
        else:
            self.chunks[chunk] = n
            self.chunk_chars += n
            self.index.setdefault("chunk:" + chunk, set()).add(self.name)
        self.stamps["chunk:" + chunk] = stamp

    def sync(self, units: dict[str, int], chunks: dict[str, int], seq: int) -> None:
        """The replica's own account of what it holds (`ReplicaCacheLedger.held`), asked
        for at `seq`: entries it no longer holds are dropped, unless routed here after
        the report was asked for, or brought by a call still open here (the replica may
        not have that call yet); entries it holds unknown to the mirror are added."""
        transit: set[str] = set()
        for key in self.open_calls.values():
            transit.update(h for h, _ in key.units)
            transit.update("chunk:" + c for c, _, _ in key.chunks)
        for h in [h for h in self.prefixes if h not in units and h not in transit]:
            if self.stamps.get(h, 0) < seq:
                self.held_chars -= self.prefixes.pop(h)
                self.stamps.pop(h, None)
                self._unindex(h)
        for chunk in [c for c in self.chunks if c not in chunks and "chunk:" + c not in transit]:
            if self.stamps.get("chunk:" + chunk, 0) < seq:
                self.chunk_chars -= self.chunks.pop(chunk)
                self.stamps.pop("chunk:" + chunk, None)
                self._unindex("chunk:" + chunk)
        for h, n in units.items():
            if h not in self.prefixes:
                self._add_unit(h, n, seq)
        for chunk, n in chunks.items():
            if chunk not in self.chunks:
                self._add_chunk(chunk, n, seq)
        self.evict()

    def evict(self) -> None:
        """Drop the least recently used entries beyond `capacity_chars`."""
        while self.held_chars > self.capacity_chars and self.prefixes:
            h, n = self.prefixes.popitem(last=False)
            self.held_chars -= n
            self.stamps.pop(h, None)
            self._unindex(h)
        while self.chunk_chars > self.capacity_chars and self.chunks:
            chunk, n = self.chunks.popitem(last=False)
            self.chunk_chars -= n
            self.stamps.pop("chunk:" + chunk, None)
            self._unindex("chunk:" + chunk)

    def _unindex(self, entry: str) -> None:
        holders = self.index.get(entry)
        if holders is not None:
            holders.discard(self.name)
            if not holders:
                del self.index[entry]

    def forget(self) -> None:
        for h in self.prefixes:
            self._unindex(h)
        for chunk in self.chunks:
            self._unindex("chunk:" + chunk)
        self.prefixes.clear()
        self.chunks.clear()
        self.stamps.clear()
        self.open_calls.clear()
        self.prefilling.clear()
        self.prefilling_tokens = self.reported_prefill_tokens = 0
        self.prefill_ended.clear()
        self.free_tokens = None
        self.held_chars = self.chunk_chars = 0
        self.pins.clear()
        self.pinning.clear()
        self.in_flight = self.reported_queue = 0


@dataclass
class RouterCounters:
    decisions: dict[str, int] = field(default_factory=dict)
    routed_chars: int = 0  # prompt characters routed
    matched_chars: int = 0  # of those, the ones the chosen replica was believed to hold

    def count(self, decision: str) -> None:
        self.decisions[decision] = self.decisions.get(decision, 0) + 1

    @property
    def predicted_hit_rate(self) -> float:
        return self.matched_chars / self.routed_chars if self.routed_chars else 0.0


class ReplicaRouter:
    """The routing policy over a changing set of replicas, named by strings."""

    def __init__(
        self,
        replicas: Sequence[str] = (),
        policy: str = "cache_aware",
        max_imbalance: int = 4,
        capacity_chars: int = CHARS_PER_TOKEN * 16384,
        seed: int | None = 0,
    ) -> None:
        if policy not in POLICIES:
            choices = ", ".join(POLICIES)
            raise ConfigError(f"routing policy must be one of {choices}, got {policy!r}")
        if max_imbalance < 0:
            raise ConfigError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.policy = policy
        self.max_imbalance = max_imbalance
        self.capacity_chars = capacity_chars
        self.views: dict[str, ReplicaView] = {}
        self.index: dict[str, set[str]] = {}
        self.counters = RouterCounters()
        self._rr = itertools.count()
        self._seq = itertools.count(1)
        self.last_stamp = 0  # the stamp of the last call `choose` remembered
        self._random = random.Random(seed)
        self._per_token: float | None = None  # `_default_per_token`, until a report
        self._fixed_mean = 0.0
        # (replica, unit hash) -> characters, in the order last routed (`_note_routed`).
        self._recent: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._recent_chars = 0
        self._horizon = 0  # the replicas' capacities added up
        for name in replicas:
            self.add(name)

    # -- the replica set ----------------------------------------------------------------

    def add(self, name: str) -> None:
        if name not in self.views:
            self.views[name] = ReplicaView(name, self.capacity_chars, index=self.index)
            self._horizon += self.capacity_chars

    def forget(self, name: str) -> None:
        """The replica died (or was replaced): nothing it held is there any more."""
        view = self.views.get(name)
        if view is not None:
            view.forget()
            view.forgot_seq = next(self._seq)
            if view.hot_chars:  # else none of its entries is left (a replica already down)
                for entry in [e for e in self._recent if e[0] == name]:
                    self._recent_chars -= self._recent.pop(entry)
                view.hot_chars = 0

    def forgotten_since(self, name: str, seq: int) -> bool:
        """Whether the router forgot `name` after a report asked for at `seq`: that report
        comes from the process that died, and must not bring its cache (or it) back."""
        view = self.views.get(name)
        return view is not None and seq < view.forgot_seq

    def remove(self, name: str) -> None:
        self.forget(name)
        view = self.views.pop(name, None)
        if view is not None:
            self._horizon -= view.capacity_chars
        self._per_token = None

    def report_started(self) -> int:
        """The sequence number to pass to `report` for a report asked for now."""
        return next(self._seq)

    def report(
        self,
        name: str,
        queue: int,
        pins: Iterable[str] = (),
        seq: int | None = None,
        held: tuple[dict[str, int], dict[str, int]] | None = None,
        prefill_tokens: int | None = None,
        profile: tuple[float, float] | None = None,
        free_tokens: int | None = None,
    ) -> None:
        """A replica's own report: its queue (waiting + running), the pins it holds,
        (`held`) the unit hashes and chunk ids its caches hold (`ReplicaView.sync`), the
        prefill tokens queued or running there, its prefill `profile` (fixed seconds
        per prefill, seconds per token), and the free room of its KV pool in tokens.
        Its pins are ignored when the report was asked for (`seq`, from `report_started`)
        before the router last changed this replica's pins: it would undo a pin routed
        there whose prefill is still running, or bring back one just unpinned. A report
        asked for before the replica was forgotten is ignored whole (`forgotten_since`)."""
        view = self.views.get(name)
        if view is not None and not (seq is not None and seq < view.forgot_seq):
            view.reported_queue = queue
            if prefill_tokens is not None:
                view.reported_prefill(prefill_tokens, seq)
            if free_tokens is not None:
                view.free_tokens = free_tokens
            if profile is not None and profile[1] > 0:
                if (view.fixed_s, view.per_token_s) != profile:
                    self._per_token = None  # the means change
                view.fixed_s, view.per_token_s = profile
            if seq is None or seq > view.pin_seq:
                view.pins = set(pins) | view.pinning
            if held is not None:
                view.sync(held[0], held[1], seq if seq is not None else next(self._seq))

    def set_capacity(self, name: str, kv_tokens: int) -> None:
        """The replica's real KV pool, from its report (a replacement may differ)."""
        view = self.views.get(name)
        chars = CHARS_PER_TOKEN * kv_tokens
        if view is not None and kv_tokens > 0 and view.capacity_chars != chars:
            self._horizon += chars - view.capacity_chars
            view.capacity_chars = chars
            view.evict()

    def pin_settled(self, name: str, pin: str) -> None:
        """The call that pins `pin` on `name` has finished (pinned or failed): reports
        asked for from now on say the truth about it."""
        view = self.views.get(name)
        if view is not None:
            view.pinning.discard(pin)
            view.pin_seq = next(self._seq)

    def unpinned(self, pin: str) -> None:
        """`pin` was released: no replica holds it, whatever an older report says."""
        for view in self.views.values():
            if pin in view.pins or pin in view.pinning:
                view.pins.discard(pin)
                view.pinning.discard(pin)
                view.pin_seq = next(self._seq)

    # -- routing ------------------------------------------------------------------------

    def choose(
        self, key: RouteKey, exclude: Iterable[str] = (), remember: bool = True
    ) -> tuple[str, str]:
        """(replica, decision) for one call; `exclude`: replicas not to use (a retry)."""
        skip = set(exclude)
        live = [v for v in self.views.values() if v.name not in skip]
        if not live:
            raise EngineUnavailableError("no engine replica is available")
        view, decision = self._pick(key, live)
        if remember:
            self.counters.count(decision)
            self.counters.routed_chars += key.chars
            self.counters.matched_chars += view.matched_units(key)[1]
            stamp = self.last_stamp = next(self._seq)
            miss = self._miss_tokens(view, key)
            view.remember(key, stamp)
            if self.policy == "cache_aware":  # the only policy that reads it
                self._note_routed(view, key)
            view.open_calls[stamp] = key
            view.prefilling[stamp] = miss
            view.prefilling_tokens += miss
            if key.pin is not None:
                self.unpinned(key.pin)
                view.pins.add(key.pin)
                view.pinning.add(key.pin)
                view.pin_seq = next(self._seq)
        return view.name, decision

    def _pick(self, key: RouteKey, live: list[ReplicaView]) -> tuple[ReplicaView, str]:
        if self.policy == "round_robin":
            return live[next(self._rr) % len(live)], "round_robin"
        if self.policy == "pow2":
            pair = self._random.sample(live, min(2, len(live)))
            return min(pair, key=lambda v: v.load), "pow2"
        if key.pin is not None:
            holder = next((v for v in live if key.pin in v.pins), None)
            if holder is not None:
                return holder, "pin"
        # The safety cap: a replica this much deeper than the least-loaded is no candidate.
        floor = min(v.load for v in live)
        allowed = [v for v in live if v.load - floor <= self.max_imbalance]
        # Only replicas holding the first unit or one of the chunks can score above 0; the
        # others differ only in their queues.
        names: set[str] = set()
        if key.units:
            names |= self.index.get(key.units[0][0], set())
        for chunk, _, _ in key.chunks:
            names |= self.index.get("chunk:" + chunk, set())
        per_token = self._default_per_token()
        scored = [(v.score(key), v) for v in live if v.name in names]
        best_score = max((score for score, _ in scored), default=0.0)
        options = [(score, v) for score, v in scored if v.load - floor <= self.max_imbalance]
        costs = [self._cost(v, key, score, per_token) for score, v in options]
        # The replicas holding nothing, costed alike (one pass: at hundreds of replicas this
        # loop is most of the router's time). For a call held nowhere, any of them not far
        # costlier than the cheapest may take it (`_place`); else only the cheapest can win.
        miss = self._miss_tokens(allowed[0], key, 0.0)  # the same on every empty replica
        if best_score <= 0:
            candidates = [(c, v) for c, (_, v) in zip(costs, options)] + [
                (self._cost(v, key, 0.0, per_token, miss, v.load), v)
                for v in allowed
                if v.name not in names
            ]
            return self._place(candidates, key, per_token), "balance"
        cheapest, lowest = None, (0.0, 0, 0)
        for v in allowed:
            if v.name in names:
                continue
            load = v.load
            rank = (self._cost(v, key, 0.0, per_token, miss, load), load, v.held_chars)
            if cheapest is None or rank < lowest:
                cheapest, lowest = v, rank
        if cheapest is not None:
            options.append((0.0, cheapest))
            costs.append(lowest[0])
        *_, i = min(
            (costs[i], -score, v.load, v.held_chars, i) for i, (score, v) in enumerate(options)
        )
        score, chosen = options[i]
        return chosen, "affinity" if score >= best_score else "fallback"

    def _place(
        self, candidates: list[tuple[float, ReplicaView]], key: RouteKey, per_token: float
    ) -> ReplicaView:
        """Where a call held nowhere goes, of `candidates` (estimated TTFT, replica): a new
        prefix, whose later calls hit where it lands. Among the replicas not far costlier
        than the cheapest (`_far_above`), the one with the least of the recent working set
        (`hot_chars`): a queue only momentarily shorter must not draw every new prefix to
        one replica, whose cache then evicts them while the other's holds little (seen in
        scale.py's open loop: 6 apps of 8 on one replica)."""
        low, cheapest = min(candidates, key=lambda e: (e[0], e[1].load, e[1].held_chars))
        # Near: at most this call's own full prefill (on the cheapest) costlier, or 1.5x.
        band = (cheapest.per_token_s or per_token) * key.chars / CHARS_PER_TOKEN
        near = [(c, v) for c, v in candidates if not self._far_above(c, low, band)]
        # Working sets within one call's size of the least count as level: the cost decides
        # between them, not a few characters.
        least = min(v.hot_chars for _, v in near) + key.chars
        level = [(c, v) for c, v in near if v.hot_chars <= least]
        return min(level, key=lambda e: (e[0], e[1].load, e[1].held_chars))[1]

    @staticmethod
    def _far_above(cost: float, low: float, band: float) -> bool:
        """Whether an estimated TTFT `cost` is far above `low`: by more than `band` seconds
        and by more than `BALANCE_RATIO` times (two thresholds, absolute and relative)."""
        return cost - low > band and cost > BALANCE_RATIO * low

    def _note_routed(self, view: ReplicaView, key: RouteKey) -> None:
        """Count `key`'s units in `view`'s share of the recent routing (`hot_chars`): what
        its later calls would hit there. Recent means within the cluster's cache horizon:
        the last distinct units routed anywhere that the replicas' capacities add up to,
        older ones dropped first. Unlike the mirror, which every report fills to capacity
        with whatever the cache still holds, this measures the working set the router
        itself sent there."""
        for h, n in key.units:
            if n <= 0:
                continue  # no characters, nothing held: it would only grow the record
            entry = (view.name, h)
            if entry in self._recent:
                self._recent.move_to_end(entry)
                continue
            self._recent[entry] = n
            self._recent_chars += n
            view.hot_chars += n
        while self._recent_chars > self._horizon and self._recent:
            (name, _), n = self._recent.popitem(last=False)
            self._recent_chars -= n
            owner = self.views.get(name)
            if owner is not None:
                owner.hot_chars -= n

    def _default_per_token(self) -> float:
        """The mean reported per-token cost, for replicas that did not report one yet (and
        `_fixed_mean`, the mean fixed cost, likewise)."""
        if self._per_token is None:
            known = [v for v in self.views.values() if v.per_token_s]
            self._per_token = (
                sum(v.per_token_s or 0.0 for v in known) / len(known)
                if known
                else DEFAULT_PER_TOKEN_S
            )
            self._fixed_mean = sum(v.fixed_s for v in known) / len(known) if known else 0.0
        return self._per_token

    @staticmethod
    def _miss_tokens(view: ReplicaView, key: RouteKey, score: float | None = None) -> int:
        held = view.score(key) if score is None else score
        return max(round((key.chars - held) / CHARS_PER_TOKEN), 0)

    def _cost(
        self,
        view: ReplicaView,
        key: RouteKey,
        score: float,
        per_token: float,
        miss: int | None = None,
        load: int | None = None,
    ) -> float:
        """Estimated seconds to this call's first token on `view` (the module's docstring);
        `miss` and `load`, when the caller has them, save recomputing them."""
        if miss is None:
            miss = self._miss_tokens(view, key, score)
        if view.free_tokens is not None:  # the replica's own account of its pool, less
            # what the prefill queued there will take of it first
            overflow = miss - max(view.free_tokens - view.queued_prefill_tokens, 0)
        else:  # the mirror's guess
            overflow = (view.held_chars + CHARS_PER_TOKEN * miss - view.capacity_chars) / (
                CHARS_PER_TOKEN
            )
        evicted = overflow if overflow > 0 else 0.0
        tokens = view.queued_prefill_tokens + miss + EVICTION_WEIGHT * evicted
        load = view.load if load is None else load
        fixed = view.fixed_s if view.per_token_s else self._fixed_mean
        return (view.per_token_s or per_token) * tokens + fixed * (load + 1)

    def ttft_estimate(self, name: str, key: RouteKey) -> float:
        """The cost model's estimate for `key` on replica `name` (seconds, or relative
        units before any replica reported its prefill profile)."""
        view = self.views[name]
        return self._cost(view, key, view.score(key), self._default_per_token())

    def first_output(self, name: str, stamp: int) -> None:
        """The call routed at `stamp` has its first output: its prefill is no longer
        queued on `name`."""
        view = self.views.get(name)
        if view is not None:
            view.prefill_done(stamp, next(self._seq))

    def call_done(self, name: str, stamp: int) -> None:
        """The call routed at `stamp` (`last_stamp` after its `choose`) is over: reports
        asked for from now on know whether its prefix stayed cached."""
        view = self.views.get(name)
        if view is not None:
            view.open_calls.pop(stamp, None)
            view.prefill_done(stamp, next(self._seq))

    def started(self, name: str) -> None:
        view = self.views.get(name)
        if view is not None:
            view.in_flight += 1

    def finished(self, name: str) -> None:
        view = self.views.get(name)
        if view is not None and view.in_flight > 0:
            view.in_flight -= 1

    def holder_of(self, pin: str) -> str | None:
        return next((v.name for v in self.views.values() if pin in v.pins), None)

    def imbalance(self) -> float:
        """max load / mean load over replicas (1.0 is perfectly even; 0 when idle)."""
        loads = [v.load for v in self.views.values()]
        mean = sum(loads) / len(loads) if loads else 0
        return max(loads) / mean if mean else 0.0
