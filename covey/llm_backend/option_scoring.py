"""Whole-option choices: score every option's full continuation, then pick one.

Why not the trie (choices.py) everywhere: it commits to an option's first token before
seeing the rest, so an option whose first token is likely but whose continuation is not
(or two options sharing a first token) gets chosen on a fraction of the evidence. Scoring
each whole option by log P(option | prompt), as SGLang's `select` does, uses all of it.

How it runs, on top of the prompt's KV (the request prefills its prompt like any other):
- the prompt's last logits give every option's first-token log-probability, so options of
  one token cost nothing more (most classification labels);
- every longer option is a fork of the prompt's sequence (shared blocks, copy-on-write on
  the last partial block) holding its own tokens; a request's forks run in one batched
  forward (in groups when the KV pool or the step's token budget cannot take them at
  once), whose logits at every option position give the rest of the option's
  log-probabilities;
- each group's forks are freed after its forward; the request finishes with the chosen
  option.
Scoring runs inside the engine step that computed the prompt's last token, one request
after another: the step's other requests wait for it (bounded by AUTO_TRIE_TOKENS under
"auto"). The scheduler asks for the forks' blocks (the longest option's) with the step that
completes the prompt, so a request whose forks do not fit waits in the queue as a decode
that cannot grow does. Should the pool still lack them when scoring starts, the engine
preempts the lowest-priority running requests, newest first (the scored request itself
when it is the lowest; it recomputes its prompt and is scored then), so a busy pool delays
a request, never fails it.

Ranking: with `length_normalize` (the default) by mean log-probability per token, else by
the total. The total favours short options (every token costs probability); the mean does
not, but can favour a long option whose later tokens are predictable. Greedy takes the
best; sampling draws from softmax(score / temperature) over the options (top-k and top-p
apply to the options). Options are held in one canonical order (sorted), so the answer,
seeded samples included, does not depend on the order the caller listed them in.

An option whose tokens begin another option's ("yes" and "yes indeed"): P(option) counts
every continuation, the longer option's among them, so on its own the shorter one would
always win by the total. It is ranked by P(the option, then not the rest of a longer one):
log P(option) + log(1 - sum over the options that extend it directly of P(their rest |
it)), which costs no forward (the longer options' own log-probabilities of those tokens). The
options' events are then disjoint, so no option's score contains another's (the trie ends
such an option on EOS instead). `choice_logprobs` reports the plain log P(option | prompt).

Measured in benchmarks/choices.py (24 labelled tickets, 4 teams, SmolLM2-135M): with the
options only in the gen, whole options ranked by mean log-probability route 15/24, by the
total 7/24, the trie 11/24; every scoring gives the same answers whatever the order the
options are listed in. Listing the teams in the prompt biases a model this small towards
the team named first, whatever the scoring (8, 11 and 12 of 24): that bias is the prompt's.

When the trie is used instead ("auto"): when the options' tokens together pass
AUTO_TRIE_TOKENS, scoring every option costs a prefill of all of them (compute and KV
blocks), while the trie decodes only as many steps as its longest path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import torch

from covey.errors import EngineError, InvalidRequestError
from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.sampler import sample
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import Sequence

# "auto" scores whole options up to this many option tokens in all, then uses the trie.
AUTO_TRIE_TOKENS = 512


def use_trie(params: SamplingParams, option_ids: SequenceABC[SequenceABC[int]]) -> bool:
    """Whether `params.choices` go through the trie (see the module docstring)."""
    if params.choice_scoring == "auto":
        return sum(len(ids) for ids in option_ids) > AUTO_TRIE_TOKENS
    return params.choice_scoring == "trie"


@dataclass(frozen=True)
class OptionScorer:
    """One request's options (sorted: a canonical order), their token ids, and how to rank
    them. `order`: the options as the caller listed them, for the output."""

    options: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    length_normalize: bool
    order: tuple[str, ...]
    # Each option's longest proper token prefix among the options (its index), or None.
    parents: tuple[int | None, ...] = ()

    @classmethod
    def build(
        cls, params: SamplingParams, encode: Callable[[str], list[int]]
    ) -> OptionScorer:
        options = tuple(sorted(params.choices))
        ids = []
        seen: dict[tuple[int, ...], str] = {}
        for option in options:
            tokens = tuple(encode(option))
            if not tokens:
                raise InvalidRequestError(f"choice {option!r} has no tokens")
            if tokens in seen:
                raise InvalidRequestError(
                    f"choices {seen[tokens]!r} and {option!r} tokenize the same; make them differ"
                )
            seen[tokens] = option
            ids.append(tokens)
        index = {tokens: i for i, tokens in enumerate(ids)}
        parents = tuple(
            next((index[t[:k]] for k in range(len(t) - 1, 0, -1) if t[:k] in index), None)
            for t in ids
        )
        return cls(options, tuple(ids), params.length_normalize, params.choices, parents)

    @property
    def max_tokens(self) -> int:
        return max(len(ids) for ids in self.token_ids)

    def ranking(self, token_logprobs: list[list[float]]) -> list[float]:
        """The score each option is ranked by: mean or total log-probability of the option
        and not of a longer option it begins (see the module docstring). `token_logprobs`:
        each option's log-probability of each of its tokens (`option_logprobs`)."""
        ends = self.end_logprobs(token_logprobs)
        totals = [sum(lps) + end for lps, end in zip(token_logprobs, ends)]
        if not self.length_normalize:
            return totals
        return [lp / len(ids) for lp, ids in zip(totals, self.token_ids)]

    def end_logprobs(self, token_logprobs: list[list[float]]) -> list[float]:
        """log P(not continuing into a longer option | the option) of every option: 0 for
        one that begins no other, log(1 - sum of its direct extensions' P(rest | it)).

        P(rest | it) comes from the extension's own tokens past the option's length, not
        from the difference of two totals: those were computed in different forwards (other
        groups, other row counts), whose rounding would not cancel, so a nearly certain
        continuation could come out at 1 or more."""
        shares = [0.0] * len(token_logprobs)
        for child, parent in enumerate(self.parents):
            if parent is not None:
                rest = token_logprobs[child][len(self.token_ids[parent]) :]
                shares[parent] += math.exp(sum(rest))
        # A share rounded to 1 or more: continuing is certain, ending has no probability.
        return [math.log1p(-share) if share < 1.0 else -math.inf for share in shares]

    def pick(
        self,
        token_logprobs: list[list[float]],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> int:
        """The chosen option's index: the best score (greedy; ties go to the first in
        sorted order) or a draw from softmax(score / temperature)."""
        scores = torch.tensor([self.ranking(token_logprobs)], dtype=torch.float32)
        picked = sample(scores, [params], [generator])
        if picked.errors:
            raise picked.errors[0]
        index = picked.tokens[0]
        assert index is not None
        return index


@dataclass(frozen=True)
class ScoringContext:
    """What scoring needs from the engine: the model, its KV pool and block manager, and
    the most tokens one forward may take (the scheduler's step budget)."""

    model: LlamaModel
    pool: KVPool
    block_manager: BlockManager
    max_tokens_per_forward: int


def option_logprobs(
    ctx: ScoringContext, seq: Sequence, scorer: OptionScorer, last_logits: torch.Tensor
) -> list[list[float]]:
    """Every option's log-probability of each of its tokens given the prompt and the tokens
    before it, in `scorer`'s order; their sum is log P(option | prompt).

    `seq` holds the prompt's KV (all of it computed); `last_logits` [V] are the logits at
    its last token. Raises EngineError when the pool cannot take even one option's fork.
    """
    first = torch.log_softmax(last_logits.float(), dim=-1)
    per_token = [[float(first[ids[0]])] for ids in scorer.token_ids]
    longer = [(i, ids) for i, ids in enumerate(scorer.token_ids) if len(ids) > 1]
    while longer:
        group, longer = _fit_group(ctx, seq, longer)
        for i, rest in _score_group(ctx, seq, group).items():
            per_token[i] += rest
    return per_token


@dataclass
class _Fork:
    """One option's fork of the prompt's sequence: its tokens but the last (each input
    predicts the next), blocks allocated, and the block copies to make first."""

    index: int
    option: tuple[int, ...]
    seq: Sequence
    copies: list[tuple[int, int]]


def _fit_group(
    ctx: ScoringContext, seq: Sequence, todo: list[tuple[int, tuple[int, ...]]]
) -> tuple[list[_Fork], list[tuple[int, tuple[int, ...]]]]:
    """Fork `seq` for as many options of `todo` as the pool and the token budget take now;
    returns the forks (their blocks allocated) and the options left for a later group."""
    bm = ctx.block_manager
    forks: list[_Fork] = []
    budget = ctx.max_tokens_per_forward
    try:
        for i, option in todo:
            n = len(option) - 1  # the last token is never input: nothing follows it to score
            if forks and n > budget:
                break
            tokens = seq.token_ids + list(option[:-1])
            child = Sequence(f"{seq.request_id}#option{i}", tokens, seq.params)
            bm.fork(seq, child)
            fork = _Fork(i, option, child, [])
            forks.append(fork)  # holds blocks from here: freed below on any error
            if not bm.can_allocate(bm.blocks_needed(child, n)):
                forks.pop()
                bm.free(child)
                if not forks:  # the engine made room for the largest fork: a fault
                    raise EngineError(
                        f"no KV room to score choice {i} ({len(option)} tokens) although "
                        "room was made for it"
                    )
                break
            fork.copies = bm.allocate_slots(child, n)
            budget -= n
    except BaseException:
        # No block may outlive the request: `_score_group`, which frees the forks on every
        # path, is never reached.
        for fork in forks:
            bm.free(fork.seq)
        raise
    return forks, todo[len(forks) :]


def _score_group(
    ctx: ScoringContext, seq: Sequence, forks: list[_Fork]
) -> dict[int, list[float]]:
    """One batched forward over the forks' option tokens; returns each option's
    log-probabilities of its tokens after the first. Frees the forks' blocks."""
    try:
        with torch.inference_mode():
            ctx.pool.copy_blocks([c for fork in forks for c in fork.copies])
            inputs = _inputs(ctx, seq.num_computed_tokens, forks)
            hidden = ctx.model(inputs.input_ids, inputs.positions, ctx.pool.kv, inputs.meta)
            logprobs = torch.log_softmax(ctx.model.compute_logits(hidden), dim=-1)  # [T, V]
            out: dict[int, list[float]] = {}
            for fork, run in zip(forks, inputs.meta.prefills):
                # The logits at the option's k-th token predict its (k+1)-th.
                targets = torch.tensor(fork.option[1:], device=logprobs.device)[:, None]
                out[fork.index] = logprobs[run.start : run.end].gather(1, targets)[:, 0].tolist()
            return out
    finally:
        for fork in forks:
            ctx.block_manager.free(fork.seq)


@dataclass
class _Inputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata


def _inputs(ctx: ScoringContext, start: int, forks: list[_Fork]) -> _Inputs:
    """The forward's tensors: every fork is a prefill run from `start` (the prompt's
    length) over the prompt's keys in the pool and its own."""
    dev = ctx.pool.kv.device
    bs = ctx.block_manager.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    spans: list[tuple[int, int, list[int]]] = []
    for fork in forks:
        table, new = fork.seq.block_table, fork.seq.token_ids[start:]
        spans.append((len(ids), len(new), table))
        ids += new
        positions += range(start, start + len(new))
        slots += [table[p // bs] * bs + p % bs for p in range(start, start + len(new))]
    pos = torch.tensor(positions, dtype=torch.long, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
        num_decode=0,
        block_size=bs,
        prefills=[],
    )
    for offset, n, table in spans:
        q_pos = pos[offset : offset + n]
        mask = torch.arange(start + n, device=dev)[None, :] <= q_pos[:, None]  # [n, L]
        blocks = torch.tensor(table, dtype=torch.long, device=dev)
        meta.prefills.append(PrefillRun(offset, offset + n, blocks, mask))
    return _Inputs(torch.tensor(ids, dtype=torch.long, device=dev), pos, meta)
