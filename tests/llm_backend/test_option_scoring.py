"""Whole-option choices: each option's full continuation scored on the prompt's shared KV."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from covey.llm_backend import option_scoring
from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.pause_policy import PauseCosts, PausePolicy
from covey.llm_backend.paused_kv import PausedKV
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import Scheduler, SchedulerConfig
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus

PROMPT = "Support ticket: my laptop screen flickers after the update.\nTeam:"
_starts = itertools.count(10_000, 10_000)
OPTIONS = (" hardware repair", " billing", " account access and passwords", " shipping")


def reference_logprob(engine, prompt: str, option: str) -> float:
    """log P(option | prompt) from one plain causal forward over prompt + option, on a pool
    of its own: what scoring on forked, shared KV must reproduce."""
    prompt_ids = engine.tokenizer.encode(prompt)
    option_ids = engine.tokenizer.encode(option)
    ids = prompt_ids + option_ids
    model, dev = engine.model, engine.device
    pool = KVPool(model.args, -(-len(ids) // 16), 16, engine.dtype, dev)
    n = len(ids)
    run = PrefillRun(0, n, None, None)  # a fresh causal run over its own keys
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev), num_decode=0, block_size=16, prefills=[run]
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), pool.kv, meta)
        lp = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    p = len(prompt_ids)
    return sum(float(lp[p - 1 + k, t]) for k, t in enumerate(option_ids))


def choose(engine, prompt, options, **params):
    (out,) = choose_all(engine, [(prompt, options, params)])
    return out


def choose_all(engine, requests):
    """Submit (prompt, options, params) requests together; their final outputs in order."""
    rids = [engine.add_request(p, SamplingParams(choices=o, **kw)) for p, o, kw in requests]
    return engine.run_to_completion(rids)


def test_option_logprobs_equal_a_plain_forward_and_the_pool_is_freed(make_engine):
    # 12 max batched tokens: the options' forks run in several groups, not one forward.
    for engine in (make_engine(), make_engine(max_num_batched_tokens=12)):
        out = choose(engine, PROMPT, OPTIONS, choice_scoring="whole", length_normalize=False)
        assert list(out.choice_logprobs) == list(OPTIONS)  # in the caller's order
        for option, logprob in out.choice_logprobs.items():
            assert logprob == pytest.approx(reference_logprob(engine, PROMPT, option), abs=2e-3)
        best = max(OPTIONS, key=out.choice_logprobs.get)
        assert out.text == best and out.finish_reason == "stop"
        assert out.token_ids == engine.tokenizer.encode(best)
        assert engine.stats().kv_blocks_used == 0  # the prompt's and the forks' blocks


def test_length_normalisation_ranks_by_mean_logprob_per_token(make_engine):
    engine = make_engine()
    out = choose(engine, PROMPT, OPTIONS)
    lengths = {o: len(engine.tokenizer.encode(o)) for o in OPTIONS}
    assert out.text == max(OPTIONS, key=lambda o: out.choice_logprobs[o] / lengths[o])


def test_the_answer_does_not_depend_on_the_order_of_the_options(make_engine):
    engine = make_engine()
    orders = [OPTIONS, OPTIONS[::-1], OPTIONS[2:] + OPTIONS[:2]]
    greedy = choose_all(engine, [(PROMPT, order, {}) for order in orders])
    sampled = choose_all(engine, [(PROMPT, o, {"temperature": 1.0, "seed": 7}) for o in orders])
    assert len({out.text for out in greedy}) == 1
    assert len({out.text for out in sampled}) == 1
    for out in greedy[1:]:
        assert out.choice_logprobs == pytest.approx(greedy[0].choice_logprobs, abs=1e-4)


def test_sampling_draws_from_the_options_distribution(make_engine):
    engine = make_engine()
    hot = [(PROMPT, OPTIONS, {"temperature": 50.0, "seed": seed}) for seed in range(6)]
    cold = [(PROMPT, OPTIONS, {"temperature": 0.01, "seed": 1}), (PROMPT, OPTIONS, {})]
    *picks, cold_pick, greedy = (out.text for out in choose_all(engine, hot + cold))
    assert set(picks) <= set(OPTIONS) and len(set(picks)) > 1  # near-flat when this hot
    assert cold_pick == greedy


def test_auto_uses_the_trie_for_many_long_options(make_engine, monkeypatch):
    engine = make_engine()
    assert choose(engine, PROMPT, OPTIONS).choice_logprobs is not None  # whole by default
    monkeypatch.setattr(option_scoring, "AUTO_TRIE_TOKENS", 4)
    out = choose(engine, PROMPT, OPTIONS)
    assert out.choice_logprobs is None and out.text in OPTIONS  # the trie picked it
    out = choose(engine, PROMPT, OPTIONS, choice_scoring="whole")
    assert out.choice_logprobs is not None


def test_whole_options_batch_beside_other_requests(make_engine):
    engine = make_engine()
    alone = choose(engine, PROMPT, OPTIONS)
    rids = [
        engine.add_request("Once upon a time", SamplingParams(max_tokens=6)),
        engine.add_request(PROMPT, SamplingParams(choices=OPTIONS)),
        engine.add_request(PROMPT.replace("laptop", "phone"), SamplingParams(choices=OPTIONS)),
    ]
    story, together, _ = engine.run_to_completion(rids)
    assert together.text == alone.text
    assert together.choice_logprobs == pytest.approx(alone.choice_logprobs, abs=1e-4)
    assert story.choice_logprobs is None and len(story.token_ids) == 6
    assert engine.stats().kv_blocks_used == 0


def test_a_fork_that_fails_to_allocate_frees_every_fork_of_its_group(make_engine, monkeypatch):
    engine = make_engine()
    bm = engine.block_manager
    allocate, forks = bm.allocate_slots, []

    def failing_on_the_second_fork(seq, n):
        if "#option" in seq.request_id:
            forks.append(seq.request_id)
            if len(forks) == 2:
                raise RuntimeError("injected: the block manager's bookkeeping failed")
        return allocate(seq, n)

    monkeypatch.setattr(bm, "allocate_slots", failing_on_the_second_fork)
    out = choose(engine, PROMPT, OPTIONS, choice_scoring="whole")
    assert out.finish_reason == "error" and "injected" in out.error and len(forks) == 2
    assert engine.stats().kv_blocks_used == 0  # the first fork, the failed one, the prompt
    assert sum(bm.ref_counts) == 0


NEIGHBOUR_TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def scored_alone(make_engine):
    """PROMPT's answer on a roomy pool, and how many blocks its prompt takes."""
    big = make_engine()
    blocks = -(-len(big.tokenizer.encode(PROMPT)) // 16)
    return choose(big, PROMPT, OPTIONS, choice_scoring="whole"), blocks


def count_scored_prompt_tokens(engine, monkeypatch) -> dict[str, int]:
    """Counts the prompt tokens the engine's forwards compute for scored requests."""
    counts = {"tokens": 0}
    execute = engine.runner.execute_isolated

    def counting(scheduled, copies, chunks):
        counts["tokens"] += sum(i.num_new_tokens for i in scheduled if i.seq.option_scorer)
        return execute(scheduled, copies, chunks)

    monkeypatch.setattr(engine.runner, "execute_isolated", counting)
    return counts


@pytest.mark.parametrize("scorer_first", [True, False], ids=["older", "outranked"])
def test_a_request_whose_forks_do_not_fit_waits_in_the_queue(make_engine, scorer_first):
    """The scored request's prompt and a neighbour's fit the pool together but the forks
    do not: the scheduler asks for the forks' blocks with the prompt, so the later or
    lower-priority request waits in the queue (as a decode that cannot grow) and nothing
    is preempted; both get the answers they get alone."""
    scored, prompt_blocks = scored_alone(make_engine)
    big = make_engine()
    neighbour = big.tokenizer.encode(NEIGHBOUR_TEXT)[: 3 * 16 - 1]  # all but the prompt's
    filler = SamplingParams(max_tokens=4, ignore_eos=True)
    (filled,) = big.run_to_completion([big.add_request(neighbour, filler)])
    engine = make_engine(kv_cache_tokens=(prompt_blocks + 3) * 16)
    rids = [
        engine.add_request(PROMPT, SamplingParams(choices=OPTIONS), priority=0),
        engine.add_request(neighbour, filler, priority=0 if scorer_first else -1),
    ]
    outs = []
    choice, other = engine.run_to_completion(rids, on_output=outs.append)
    assert choice.finish_reason == "stop" and choice.text == scored.text
    assert choice.choice_logprobs == pytest.approx(scored.choice_logprobs, abs=1e-3)
    assert other.token_ids == filled.token_ids and other.finish_reason == "length"
    assert choice.metrics.num_preemptions == 0 and other.metrics.num_preemptions == 0
    assert not any(o.finish_reason == "error" for o in outs)
    assert engine.stats().kv_blocks_used == 0


def test_scoring_makes_room_when_the_reservation_falls_short(make_engine, monkeypatch):
    """The fallback: with the forks' blocks not reserved (the reservation disabled here to
    reach it), the prompt and a newer neighbour's fill the pool in one step, so no fork fits
    when scoring starts. The newest lowest-priority request is preempted once and
    recomputed, as for a decode that cannot grow; the scored request gets its answer."""
    scored, prompt_blocks = scored_alone(make_engine)
    engine = make_engine(kv_cache_tokens=(prompt_blocks + 3) * 16)
    monkeypatch.setattr(type(engine.scheduler), "_fork_reserve", lambda self, seq, n: 0)
    neighbour = engine.tokenizer.encode(NEIGHBOUR_TEXT)[: 3 * 16 - 1]
    filler = SamplingParams(max_tokens=4, ignore_eos=True)
    rids = [
        engine.add_request(PROMPT, SamplingParams(choices=OPTIONS)),
        engine.add_request(neighbour, filler),
    ]
    choice, other = engine.run_to_completion(rids)
    assert choice.text == scored.text and choice.metrics.num_preemptions == 0
    assert other.finish_reason == "length" and other.metrics.num_preemptions == 1
    assert engine.stats().kv_blocks_used == 0


def test_a_lower_priority_scorer_is_computed_once_while_a_decode_holds_the_room(
    make_engine, monkeypatch
):
    """A higher-priority decode grows into the blocks the forks would need. The scored
    request is not admitted, prefilled and preempted by its own scoring on every step of
    the decode: it waits, then computes its prompt once."""
    scored, prompt_blocks = scored_alone(make_engine)
    engine = make_engine(kv_cache_tokens=(prompt_blocks + 4) * 16)
    counts = count_scored_prompt_tokens(engine, monkeypatch)
    neighbour = engine.tokenizer.encode(NEIGHBOUR_TEXT)[:33]  # grows from 3 blocks to 4
    rids = [
        engine.add_request(neighbour, SamplingParams(max_tokens=15, ignore_eos=True), priority=-1),
        engine.add_request(PROMPT, SamplingParams(choices=OPTIONS, choice_scoring="whole")),
    ]
    other, choice = engine.run_to_completion(rids)
    assert choice.text == scored.text and other.finish_reason == "length"
    assert choice.metrics.num_preemptions <= 1
    assert counts["tokens"] == len(engine.tokenizer.encode(PROMPT))
    assert engine.stats().kv_blocks_used == 0


def test_a_scorer_alone_frees_preserved_paused_kv(make_engine):
    """pause_policy="preserve" keeps a paused request's KV while others run. A scored
    request whose forks need that room and that nothing else would ever free (it runs
    alone) takes it as a plain request would, instead of preempting itself every step."""
    scored, _ = scored_alone(make_engine)
    engine = make_engine(kv_cache_tokens=5 * 16, pause_policy="preserve")
    neighbour = engine.tokenizer.encode(NEIGHBOUR_TEXT)[:33]
    paused_params = SamplingParams(max_tokens=1, pause_at_end=True)
    (paused,) = engine.run_to_completion([engine.add_request(neighbour, paused_params)])
    assert paused.finish_reason == "paused" and engine.stats().kv_blocks_used == 3
    rid = engine.add_request(PROMPT, SamplingParams(choices=OPTIONS, choice_scoring="whole"))
    outs = []
    for _ in range(5):
        outs += engine.step()
    (choice,) = [o for o in outs if o.request_id == rid]
    assert choice.finished and choice.text == scored.text
    assert choice.metrics.num_preemptions == 0


def test_an_option_that_begins_another_is_ranked_without_the_longer_ones_mass(make_engine):
    """" 7" begins " 7, 8": P(" 7") counts every continuation, ", 8" among them, so by the
    total alone " 7" would always win. Ranked as " 7 and not , 8", the longer option wins
    exactly when the model continues into it more often than not."""
    engine = make_engine()
    encode = engine.tokenizer.encode
    prompt = "Counting: 1, 2, 3, 4, 5, 6,"
    for short, long in ((" 7", " 7, 8"), (" 7", " 7 bananas")):
        assert encode(long)[: len(encode(short))] == encode(short)  # a token prefix
        out = choose(engine, prompt, (short, long), choice_scoring="whole", length_normalize=False)
        rest = math.exp(out.choice_logprobs[long] - out.choice_logprobs[short])
        assert out.text == (long if rest > 0.5 else short)
        assert (rest > 0.5) == (long == " 7, 8")  # the counting goes on; bananas do not


def test_nested_options_each_keep_only_what_no_longer_option_takes():
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    scorer = option_scoring.OptionScorer.build(
        SamplingParams(choices=("a", "ab", "abc", "ad", "x"), length_normalize=False), encode
    )
    assert scorer.options == ("a", "ab", "abc", "ad", "x")
    assert scorer.parents == (None, 0, 1, 0, None)
    lp = [[-1.0], [-1.0, -1.0], [-1.0, -1.0, -0.5], [-1.0, -2.0], [-4.0]]  # sums -1 .. -4
    expected = [
        math.log(math.exp(-1.0) - math.exp(-2.0) - math.exp(-3.0)),  # a, not ab nor ad
        math.log(math.exp(-2.0) - math.exp(-2.5)),  # ab, not abc
        -2.5,
        -3.0,
        -4.0,
    ]
    assert scorer.ranking(lp) == pytest.approx(expected)
    # "ab" always goes on to "abc": P(c | ab) = 1 from abc's own last token.
    certain = scorer.ranking([[-1.0], [-1.0, 0.0], [-1.0, 0.0, 0.0], [-1.0, -8.0], [-4.0]])
    assert certain[1] == -math.inf and certain[2] == -1.0


def test_a_continuation_share_comes_from_the_longer_options_own_tokens():
    """"ab"'s tokens were computed in another forward than "a b"'s ("b" differs in the
    last digits): P(c | ab) is abc's last token alone, nearly certain but below 1, where the
    difference of the two totals would round above 1 and leave "ab" no probability."""

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    scorer = option_scoring.OptionScorer.build(
        SamplingParams(choices=("ab", "abc"), length_normalize=False), encode
    )
    ab, abc = [-0.5, -0.3], [-0.5, -0.29, -1e-6]
    assert math.exp(sum(abc) - sum(ab)) > 1.0  # the totals' difference
    ranked = scorer.ranking([ab, abc])
    assert ranked[0] == pytest.approx(-0.8 + math.log1p(-math.exp(-1e-6)))
    assert ranked[1] == pytest.approx(sum(abc))


def test_the_step_that_completes_a_scored_prompt_holds_its_forks_blocks():
    """Scheduler alone: a scored prompt is admitted only with room for its forks too, and a
    request admitted after it in the same step leaves that room alone; a chunk that does
    not complete the prompt asks for none."""

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    def scored(name: str, n: int) -> Sequence:
        s = Sequence(name, list(range(1000, 1000 + n)), SamplingParams())
        s.option_scorer = option_scoring.OptionScorer.build(
            SamplingParams(choices=("x", "yyyyyyyyy")), encode
        )
        return s

    assert scored("a", 6).fork_tokens == 8
    # 6 prompt tokens: 2 blocks of 4; the forks' 8 more: positions 6..13, 2 more blocks
    # and a copy of the shared, half-filled last block: 5 blocks in all.
    sched = Scheduler(SchedulerConfig(8, 64), BlockManager(6, 4, enable_prefix_caching=False))
    a, b = scored("a", 6), Sequence("b", list(range(2000, 2008)), SamplingParams())
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(i.seq.request_id, i.reserved) for i in out.scheduled] == [("a", 3)]
    assert sched.waiting == [b] and sched.block_manager.num_free_blocks == 4  # b fits 2

    sched = Scheduler(SchedulerConfig(8, 64), BlockManager(4, 4, enable_prefix_caching=False))
    sched.add(scored("c", 6))
    out = sched.schedule()  # 5 blocks would be needed, more than the pool: it fails
    assert out.scheduled == [] and [s.request_id for s, _ in out.failed] == ["c"]
    assert "and 3 blocks for its option forks" in str(out.failed[0][1])
    # 4 tokens a step: admitted with room for the whole prompt and its forks, a first
    # chunk that does not complete the prompt holds none back; without that room it waits.
    sched = Scheduler(SchedulerConfig(8, 4), BlockManager(5, 4, enable_prefix_caching=False))
    sched.add(scored("d", 6))
    (item,) = sched.schedule().scheduled
    assert item.num_new_tokens == 4 and item.reserved == 0
    sched = Scheduler(SchedulerConfig(8, 4), BlockManager(6, 4, enable_prefix_caching=False))
    e = Sequence("e", list(range(3000, 3004)), SamplingParams(), priority=-1)
    sched.add(e)
    sched.schedule()
    e.num_computed_tokens, e.token_ids = 4, e.token_ids + [0]  # e decodes: 2 blocks
    d = scored("d", 6)  # 4 blocks are left, e outranks it: it waits
    sched.add(d)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [e] and sched.waiting == [d] and not d.block_table


def scored_seq(name: str, n: int, priority: int = 0, longest: int = 9) -> Sequence:
    """Scheduler alone: a scored request of `n` prompt tokens unlike any other's, whose
    forks take `longest - 1` tokens."""
    start = next(_starts)
    s = Sequence(name, list(range(start, start + n)), SamplingParams(), priority)
    s.option_scorer = option_scoring.OptionScorer.build(
        SamplingParams(choices=("x", "y" * longest)), lambda text: [ord(c) for c in text]
    )
    return s


def plain_seq(name: str, n: int, priority: int = 0) -> Sequence:
    start = next(_starts)
    return Sequence(name, list(range(start, start + n)), SamplingParams(), priority)


def run_step(sched: Scheduler) -> list[tuple[str, int, int]]:
    """Pretend the model ran: advance cursors, append a token where a sample is due;
    (request, tokens, reserved blocks) of each scheduled item."""
    out = sched.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == len(item.seq):
            item.seq.token_ids.append(0)
    return [(i.seq.request_id, i.num_new_tokens, i.reserved) for i in out.scheduled]


def test_a_chunked_scored_prompt_short_of_its_forks_room_waits_keeping_its_kv():
    """Scheduler alone, 4 tokens a step, a 6-block pool of 4-token blocks. The scored d
    (6 tokens: 2 blocks, its forks 3 more) gets in beside a higher-priority h with room for
    all of it, but h's decode then takes a block, so at d's last chunk the forks do not
    fit. d sits the step out keeping the 4 tokens it computed (it used to preempt itself
    and lose them), a lower-priority arrival waits behind it, and once h is done d
    completes its prompt with the forks' blocks held."""
    sched = Scheduler(SchedulerConfig(8, 4), BlockManager(6, 4, enable_prefix_caching=False))
    h, d = plain_seq("h", 3, priority=-1), scored_seq("d", 6)
    sched.add(h)
    sched.add(d)
    assert run_step(sched) == [("h", 3, 0), ("d", 1, 0)]
    assert run_step(sched) == [("h", 1, 0), ("d", 3, 0)]
    w = plain_seq("w", 4, priority=1)
    sched.add(w)
    assert run_step(sched) == [("h", 1, 0)]  # h's 2nd block leaves 3: d needs 1 + 3
    assert d.num_preemptions == 0 and d.num_computed_tokens == 4 and len(d.block_table) == 1
    assert sched.running == [h, d] and sched.waiting == [w]
    sched.finish(h, FinishReason.LENGTH)
    assert run_step(sched) == [("d", 2, 3), ("w", 2, 0)]
    assert d.num_preemptions == 0



def test_two_scored_prompts_in_one_step_hold_back_the_larger_reservation_not_the_sum():
    """The engine scores one request at a time and frees its forks before the next, so a
    step needs room for the largest fork set only: two scored prompts of 2 blocks each
    with 3-block forks fit a 7-block pool together (2 + 2 + 3), which summing their
    reservations (2 + 2 + 6) would refuse."""

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    def scored(name: str, base: int) -> Sequence:
        s = Sequence(name, list(range(base, base + 6)), SamplingParams())
        s.option_scorer = option_scoring.OptionScorer.build(
            SamplingParams(choices=("x", "yyyyyyyyy")), encode
        )
        return s

    sched = Scheduler(SchedulerConfig(8, 64), BlockManager(7, 4, enable_prefix_caching=False))
    sched.add(scored("a", 1000))
    sched.add(scored("b", 2000))
    out = sched.schedule()
    assert [(i.seq.request_id, i.reserved) for i in out.scheduled] == [("a", 3), ("b", 3)]
    assert sched.block_manager.num_free_blocks == 3


@pytest.mark.parametrize("prompt_len", [20, 32, 33], ids=["partial", "full", "one-over"])
@pytest.mark.parametrize("n", [1, 3, 12, 30])
def test_fork_blocks_needed_is_what_a_fork_then_needs(prompt_len, n):
    """The blocks reserved for a fork (ahead of the prompt's last chunk, and when scoring
    starts) are what the block manager's own rule then asks of the fork: a partly filled
    last block is shared, so copied."""
    bm = BlockManager(num_blocks=32, block_size=16, enable_prefix_caching=False)
    seq = Sequence("prompt", list(range(prompt_len)), SamplingParams())
    bm.allocate_slots(seq, 5)
    seq.num_computed_tokens = 5
    ahead = bm.fork_blocks_needed(seq, n, prompt_len)  # before the prompt's last chunk
    bm.allocate_slots(seq, prompt_len - 5)
    seq.num_computed_tokens = prompt_len
    now = bm.fork_blocks_needed(seq, n)
    child = Sequence("prompt#option0", seq.token_ids + [0] * n, seq.params)
    bm.fork(seq, child)
    assert ahead == now == bm.blocks_needed(child, n)
    assert bm.can_allocate(now)
    free = bm.num_free_blocks
    bm.allocate_slots(child, n)
    assert free - bm.num_free_blocks == now


def test_preempting_a_reserving_scorer_frees_its_forks_room_for_a_waiting_request():
    """Scheduler alone, 8 tokens a step, a 6-block pool of 4-token blocks. The scored r
    (7 tokens, lowest priority; forks 3 blocks) completes its prompt in the step with one
    token and reserves its forks' room; a higher-priority arrival p needs that room and
    preempts r, and w, queued behind p, then gets in in the same step: 2 blocks, which
    fit only because r's 3 reserved blocks went with it."""
    sched = Scheduler(SchedulerConfig(8, 8), BlockManager(6, 4, enable_prefix_caching=False))
    x, r = plain_seq("x", 2, priority=-1), scored_seq("r", 7, priority=1)
    sched.add(x)
    sched.add(r)
    assert run_step(sched) == [("x", 2, 0), ("r", 6, 0)]
    p, w = plain_seq("p", 1), plain_seq("w", 8)
    sched.add(p)
    sched.add(w)
    out = sched.schedule()
    scheduled = [(i.seq.request_id, i.num_new_tokens, i.reserved) for i in out.scheduled]
    assert scheduled == [("x", 1, 0), ("p", 1, 0), ("w", 6, 0)]
    assert out.preempted == [r] and sched.waiting == [r] and not r.block_table
    assert sched.block_manager.num_free_blocks == 2  # < r's 3: w fit only with them gone


def test_a_scored_prompt_over_several_steps_waits_for_its_forks_with_its_kv(
    make_engine, monkeypatch
):
    """The real engine, 8 tokens a step, a 4-block pool: the scored prompt (15 tokens, one
    block, its forks two more) is admitted with room for all of it while a higher-priority
    decode runs, and prefills in chunks; the decode then takes a second block, so at the
    prompt's last chunk the forks' room is short. The prompt waits with its KV and is
    computed once, not preempted and recomputed; its answer is the one it gets alone."""
    scored, prompt_blocks = scored_alone(make_engine)
    assert prompt_blocks == 1
    engine = make_engine(kv_cache_tokens=4 * 16, max_num_batched_tokens=8)
    counts = count_scored_prompt_tokens(engine, monkeypatch)
    neighbour = engine.tokenizer.encode(NEIGHBOUR_TEXT)[:15]  # its 17th token: a 2nd block
    rids = [
        engine.add_request(neighbour, SamplingParams(max_tokens=8, ignore_eos=True), priority=-1),
        engine.add_request(PROMPT, SamplingParams(choices=OPTIONS, choice_scoring="whole")),
    ]
    other, choice = engine.run_to_completion(rids)
    assert choice.text == scored.text and other.finish_reason == "length"
    assert choice.choice_logprobs == pytest.approx(scored.choice_logprobs, abs=1e-3)
    assert choice.metrics.num_preemptions == 0
    assert counts["tokens"] == len(engine.tokenizer.encode(PROMPT))
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize(("longest", "reserved"), [(5, 2), (9, None)], ids=["fits", "waits"])
def test_a_turn_resumed_from_host_memory_with_choices_reserves_its_forks(longest, reserved):
    """Scheduler alone, a fixed swap policy on an 8-block pool of 4-token blocks: a paused
    request's 11 tokens of KV go to host; it resumes with 2 more tokens and choices whose
    forks take `longest - 1` tokens. It is copied back only with room for its context, its
    new tokens and its forks (4 blocks and 2), holding the forks' blocks in that step;
    when the forks need 3 it stays on host, its context untouched."""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    paused = PausedKV(PausePolicy("swap", costs), bm, 1, 64)
    sched = Scheduler(SchedulerConfig(8, 64), bm, None, paused)
    c, a = plain_seq("c", 3), plain_seq("a", 11)
    sched.add(c)
    sched.add(a)
    run_step(sched)
    sched.pause(a)
    assert [m.seq for m in sched.schedule().swaps.out] == [a] and a.swapped_tokens == 11
    c.num_computed_tokens += 1
    c.token_ids.append(0)
    a.token_ids.extend([7, 8])  # the tool's result
    a.option_scorer = scored_seq("options", 1, longest=longest).option_scorer
    sched.resume(a)
    out = sched.schedule()
    items = {i.seq.request_id: (i.num_new_tokens, i.reserved) for i in out.scheduled}
    if reserved is None:
        assert items == {"c": (1, 0)} and not out.swaps.into
        assert sched.waiting == [a] and a.swapped_tokens == 11 and not a.block_table
    else:
        assert items == {"c": (1, 0), "a": (3, reserved)}
        assert [m.seq for m in out.swaps.into] == [a] and a.num_computed_tokens == 11


def running(sched: Scheduler, seq: Sequence, computed: int) -> Sequence:
    """Scheduler alone: put `seq` in `running` with `computed` tokens' KV, as if earlier
    steps had computed them (a prefix-cache hit first, where one is cached)."""
    bm = sched.block_manager
    bm.match_prefix(seq)
    bm.allocate_slots(seq, computed - seq.num_computed_tokens)
    seq.num_computed_tokens = computed
    bm.cache_full_blocks(seq)
    seq.status = SequenceStatus.RUNNING
    sched.running.append(seq)
    return seq


def test_a_scorer_short_of_its_forks_room_runs_when_it_outranks_every_runner():
    """REVIEW-reserve HIGH 1, scheduler alone: prefix caching on, 7 blocks of 4 tokens, 16
    tokens a step, one priority, arrival order s < r < d. d and r share a 2-block prefix
    and hold a block each of their own; d decodes within its last block, r has 12 of its
    24 tokens computed; the scored s has 8 of 10 computed, its last chunk needs a block and
    its forks 3; 1 block is free. Nothing outranks s, so no runner would give the room back:
    it preempts d and r (free 1, d's 1, r's 1 and their 2 shared blocks: 5 >= 4) and runs.
    Holding it instead let r preempt d and then itself, an empty step with work waiting,
    on which the engine fails the healthy r ("cannot be scheduled")."""
    sched = Scheduler(SchedulerConfig(8, 16), BlockManager(7, 4))
    s = running(sched, scored_seq("s", 10), 8)
    prefix = list(range(1, 9))
    r = running(sched, Sequence("r", prefix + list(range(100, 116)), SamplingParams()), 12)
    d = running(sched, Sequence("d", prefix + [200, 201, 202], SamplingParams()), 10)
    bm = sched.block_manager
    assert bm.num_free_blocks == 1 and d.block_table[:2] == r.block_table[:2]
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_new_tokens, i.reserved) for i in out.scheduled] == [
        ("s", 2, 3)
    ]
    assert out.preempted == [d, r] and s.num_preemptions == 0


def scheduled(out) -> list[tuple[str, int, int]]:
    return [(i.seq.request_id, i.num_new_tokens, i.reserved) for i in out.scheduled]


def test_a_prefix_only_outranked_runners_share_is_room_for_a_scorers_forks():
    """REVIEW-reserve MEDIUM 2 (i), scheduler alone: prefix caching on, 8 blocks of 4
    tokens. x (priority -1) decodes, so it outranks the scored s (8 of 10 computed: a block
    for its last chunk, 3 for its forks); a and b (priority 1) decode on a 2-block prefix
    they share and a block each. 1 block is free: with a's, b's and the prefix only they
    read, 5 >= 4. s preempts them and runs; counting only blocks one sequence holds (3) held
    s back until x finished, and lower-priority work could keep it waiting for ever."""
    sched = Scheduler(SchedulerConfig(8, 16), BlockManager(8, 4))
    running(sched, plain_seq("x", 4, priority=-1), 3)
    s = running(sched, scored_seq("s", 10), 8)
    prefix = list(range(1, 9))
    a = running(sched, Sequence("a", prefix + [100, 101, 102], SamplingParams(), 1), 10)
    b = running(sched, Sequence("b", prefix + [200, 201, 202], SamplingParams(), 1), 10)
    assert sched.block_manager.num_free_blocks == 1 and a.block_table[:2] == b.block_table[:2]
    out = sched.schedule()
    assert scheduled(out) == [("x", 1, 0), ("s", 2, 3)]
    assert out.preempted == [b, a] and s.num_preemptions == 0


def test_a_scorer_nothing_outranks_frees_preserved_paused_kv_as_a_lone_runner():
    """REVIEW-reserve MEDIUM 2 (ii), scheduler alone: a fixed preserve policy, 7 blocks of 4
    tokens. The scored s (a block for its last chunk, 3 for its forks) outranks the one
    other runner, d; a paused request keeps 3 blocks; 1 is free. Nothing would give s the
    room back, so it goes on as a lone runner did before the hold: it preempts d, and then,
    alone, the preserved KV goes too (d, recomputed, fits in the room left). It used to
    wait while d (a tool loop, say) ran."""
    bm = BlockManager(7, 4, enable_prefix_caching=False)
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    preserve = PausedKV(PausePolicy("preserve", costs), bm, 1, 64)
    sched = Scheduler(SchedulerConfig(8, 16), bm, None, preserve)
    s = running(sched, scored_seq("s", 10), 8)
    p = running(sched, plain_seq("p", 13), 12)
    sched.pause(p)
    d = running(sched, plain_seq("d", 3, priority=1), 2)
    assert bm.num_free_blocks == 1 and len(p.block_table) == 3
    out = sched.schedule()
    assert scheduled(out) == [("s", 2, 3), ("d", 3, 0)]
    assert out.preempted == [d] and not p.block_table and s.num_preemptions == 0


def test_a_held_scorer_leaves_paused_kv_alone_and_lets_only_higher_priority_requests_in():
    """REVIEW-reserve MEDIUM 3 and LOW 8, scheduler alone: paused KV given up when room
    runs short (no policy), 7 blocks of 4 tokens. x (priority -1) decodes on 2 blocks; the
    scored s needs a block for its last chunk and 3 for its forks; a paused request holds 1
    block; 2 are free. Even with the paused block s would be short (3 < 4), so it waits for
    x keeping its KV, and the paused request keeps its own: freeing it would hand its room
    to others, not to s. A higher-priority arrival gets in; a lower-priority one waits."""
    bm = BlockManager(7, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(8, 16), bm)
    x = running(sched, plain_seq("x", 7, priority=-1), 6)
    s = running(sched, scored_seq("s", 10), 8)
    p = running(sched, plain_seq("p", 4), 3)
    sched.pause(p)
    assert bm.num_free_blocks == 2
    h, low = plain_seq("h", 3, priority=-2), plain_seq("low", 2, priority=1)
    sched.add(h)
    sched.add(low)
    out = sched.schedule()
    assert scheduled(out) == [("x", 1, 0), ("h", 3, 0)]
    assert len(p.block_table) == 1 and p.discarded_tokens == 0
    assert s.num_computed_tokens == 8 and sched.running == [x, s, h] and sched.waiting == [low]
    x.num_computed_tokens += 1
    h.num_computed_tokens += 3
    sched.finish(x, FinishReason.LENGTH)
    sched.finish(h, FinishReason.LENGTH)
    out = sched.schedule()  # x's 2 blocks and h's 1 back: 5 free
    assert scheduled(out) == [("s", 2, 3), ("low", 2, 0)] and s.num_preemptions == 0


def test_a_scored_prompt_is_admitted_preempting_only_for_the_chunk_it_runs():
    """REVIEW-reserve LOW 4, scheduler alone: 4 tokens a step, 8 blocks of 4 tokens. The
    scored w (10 tokens: 3 blocks, its forks 3 more) gets in only because preempting the
    lower-priority l (3 blocks) could make room for all of it; but its first chunk takes 1
    of the 5 free blocks, so l goes on. It used to be preempted for blocks of w's later
    chunks, which the step left for later admissions."""
    sched = Scheduler(SchedulerConfig(8, 4), BlockManager(8, 4, enable_prefix_caching=False))
    low = running(sched, plain_seq("l", 11, priority=1), 10)
    w = scored_seq("w", 10)
    sched.add(w)
    out = sched.schedule()
    assert scheduled(out) == [("l", 1, 0), ("w", 3, 0)] and out.preempted == []
    assert low.num_preemptions == 0


def test_a_scorers_one_token_last_chunk_waits_for_a_higher_priority_prefill():
    """REVIEW-reserve LOW 7, scheduler alone: 6 blocks of 4 tokens. The scored s has one
    token left (sorted with the decodes, so it comes first in the step): a block for it
    and 3 for its forks, with 3 free. The higher-priority x prefills later in the step and
    will give the room back, so s waits with its KV; it used to preempt itself, as though
    nothing else ran, and compute its prompt again."""
    sched = Scheduler(SchedulerConfig(8, 16), BlockManager(6, 4, enable_prefix_caching=False))
    s = running(sched, scored_seq("s", 9), 8)
    x = running(sched, plain_seq("x", 8, priority=-1), 4)
    out = sched.schedule()
    assert scheduled(out) == [("x", 4, 0)] and out.preempted == []
    assert s.num_computed_tokens == 8 and s.num_preemptions == 0
    x.num_computed_tokens += 4
    sched.finish(x, FinishReason.LENGTH)
    assert scheduled(sched.schedule()) == [("s", 1, 3)]


@pytest.mark.parametrize("prompt_len", [9, 17], ids=["room-left", "pool-short"])
def test_a_runner_larger_than_the_pool_fails_alone_preempting_nothing(prompt_len):
    """REVIEW-reserve2 HIGH 1 and REVIEW-sched MEDIUM 1, scheduler alone: 8 blocks of 4
    tokens, no prefix caching. The scored s (one token left, its forks 4 blocks) is short
    of room and held, since the higher-priority v prefills later in the step; but v (40
    tokens: more than the pool) can never fit, so it fails in the step
    (`Scheduler._free_blocks`) before taking anything: s and t keep their KV (v used to
    preempt them both first, for nothing, and then fail alone). Once t is done, s runs
    its last token with its forks' room, or fails if it and its forks could never fit.
    (A backstop once ran s from the queue: scheduled while WAITING, or with the pool
    short, `max()` of no runners raising out of `schedule()`; it is gone, REVIEW-stop13
    L2.)"""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(8, 64), bm)
    t = running(sched, plain_seq("t", 4, priority=-1), 3)
    s = running(sched, scored_seq("s", prompt_len, longest=14), prompt_len - 1)
    v = running(sched, plain_seq("v", 40, priority=-2), 4)
    out = sched.schedule()
    assert [x for x, _ in out.failed] == [v] and out.preempted == []
    assert "cannot go on" in str(out.failed[0][1]) and v.status is SequenceStatus.FINISHED
    assert scheduled(out) == [("t", 1, 0)] and v not in sched.running + sched.waiting
    assert s.status is SequenceStatus.RUNNING and s.num_computed_tokens == prompt_len - 1
    t.num_computed_tokens += 1
    sched.finish(t, FinishReason.LENGTH)
    out = sched.schedule()
    assert out.preempted == [] and s.num_preemptions == 0
    if prompt_len == 9:  # 3 blocks and its forks' 4
        assert scheduled(out) == [("s", 1, 4)] and not out.failed
    else:  # 5 blocks and its forks' 4: more than the pool
        assert scheduled(out) == [] and [x for x, _ in out.failed] == [s]
        assert "cannot go on" in str(out.failed[0][1])


@pytest.mark.parametrize("mode", ["preserve", "adaptive"])
def test_a_scored_prompt_is_admitted_past_agents_that_take_turns_keeping_their_kv(mode):
    """REVIEW-reserve2 MEDIUM 1, scheduler alone: 9 blocks of 4 tokens, 4 tokens a step.
    Two lower-priority agents hold 3 blocks each and take turns: one decodes while the
    other is paused for a tool call keeping its KV, then they swap. The scored s (13
    tokens: 4 blocks, its forks 3 more) outranks them both. Nothing would outrank it at
    its last chunk, where preempting the runner leaves it alone and a lone runner frees
    paused KV under any policy: so that KV is room, it is admitted at once and completes
    its prompt in 4 steps with its forks' room held. It used to wait, paused KV counted as
    room only when nothing ran, until the agents' own growth forced the room (10 steps
    here, no bound with more agents), and every lower-priority request behind it too."""
    bm = BlockManager(9, 4, enable_prefix_caching=False)
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    paused = PausedKV(PausePolicy(mode, costs), bm, 1, 64)
    sched = Scheduler(SchedulerConfig(8, 4), bm, None, paused)
    a = running(sched, plain_seq("a", 12, priority=1), 11)
    b = running(sched, plain_seq("b", 12, priority=1), 11)
    sched.pause(b)
    s = scored_seq("s", 13)
    sched.add(s)
    steps = []
    for _ in range(4):
        out = sched.schedule()
        steps.append([i for i in scheduled(out) if i[0] == "s"])
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        for x, y in ((a, b), (b, a)):  # the agent that ran calls a tool; the other resumes
            if x.status is SequenceStatus.RUNNING and x.num_computed_tokens == len(x):
                if y.status is SequenceStatus.PAUSED:
                    sched.pause(x)
                    y.token_ids.append(9)
                    sched.resume(y)
                    break
    assert steps == [[("s", 3, 0)], [("s", 4, 0)], [("s", 4, 0)], [("s", 2, 3)]]
    assert s.num_computed_tokens == len(s) and s.num_preemptions == 0


def test_a_scored_prompt_that_cannot_get_its_room_leaves_adaptive_paused_kv_alone():
    """REVIEW-reserve2 LOW 3, scheduler alone: an adaptive policy that gives paused KV up
    under pressure, 9 blocks of 4 tokens, 4 tokens a step. x (priority -1) decodes on 4
    blocks; a paused request keeps 2; 3 are free. The scored s (13 tokens: 4 blocks, its
    forks 3 more) would be short even with the paused KV (3 + 2 < 7), so it waits, and
    the paused request keeps its KV: the room is decided before any is given up. It used
    to be given up toward s's whole prompt first, for nothing. Once x is done s gets in
    with the paused KV still kept."""
    bm = BlockManager(9, 4, enable_prefix_caching=False)
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    adaptive = PausedKV(PausePolicy("adaptive", costs), bm, 1, 64)
    sched = Scheduler(SchedulerConfig(8, 4), bm, None, adaptive)
    x = running(sched, plain_seq("x", 16, priority=-1), 15)
    p = running(sched, plain_seq("p", 8), 7)
    sched.pause(p)
    s = scored_seq("s", 13)
    sched.add(s)
    assert bm.num_free_blocks == 3
    out = sched.schedule()
    assert scheduled(out) == [("x", 1, 0)] and sched.waiting == [s]
    assert len(p.block_table) == 2 and not out.swaps.out and p.discarded_tokens == 0
    x.num_computed_tokens += 1
    sched.finish(x, FinishReason.LENGTH)  # its 4 blocks back: 7, all s needs
    assert scheduled(sched.schedule()) == [("s", 4, 0)] and len(p.block_table) == 2


def test_paused_requests_sharing_only_each_others_blocks_are_room_for_a_scorers_forks():
    """REVIEW-reserve2 LOW 2, scheduler alone: an adaptive policy, prefix caching on, 8
    blocks of 4 tokens. x (priority -1) decodes, so it outranks the scored s (a block for
    its last token, 3 for its forks); two paused requests hold the same 2 cached blocks
    and nothing of their own; 3 blocks are free. Freeing either alone makes no room, but
    relief frees both together (`PausedKV.freeable_blocks`), so those 2 are room: s goes on
    at once with its forks' room, without preempting itself. (Relief used to skip them
    both; s then waited for x, and an admission needing the room could starve.)"""
    bm = BlockManager(8, 4)
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    adaptive = PausedKV(PausePolicy("adaptive", costs), bm, 1, 64)
    sched = Scheduler(SchedulerConfig(8, 16), bm, None, adaptive)
    running(sched, plain_seq("x", 4, priority=-1), 3)
    s = running(sched, scored_seq("s", 9), 8)
    context = list(range(500, 508))
    a = running(sched, Sequence("a", [*context, 1], SamplingParams()), 8)
    b = running(sched, Sequence("b", [*context, 2], SamplingParams()), 8)
    sched.pause(a)
    sched.pause(b)
    assert a.block_table == b.block_table and len(a.block_table) == 2
    assert bm.num_free_blocks == 3
    out = sched.schedule()
    assert scheduled(out) == [("x", 1, 0), ("s", 1, 3)] and out.preempted == []
    assert s.num_preemptions == 0 and not a.block_table and not b.block_table


@pytest.mark.parametrize("mode", [None, "preserve", "adaptive", "swap"])
def test_random_scored_and_plain_traffic_never_stalls_a_step_and_keeps_the_forks_room(
    mode, monkeypatch
):
    """Scheduler alone, random traffic on a 9-block pool of 4-token blocks (prefix caching
    on, two shared prefixes, four priorities, 2 to 16 tokens a step) under no pause policy
    and each fixed or adaptive one: plain requests decode a few tokens and may pause for a
    tool call, then resume with its result (and now and then `choices`); scored ones end
    at their prompt; every request fits the pool alone, as the engine's admission checks
    ensure. A smoke test of the invariants around the forks' hold, not a reproduction of a
    known bug (REVIEW-reserve HIGH 1 and REVIEW-reserve2 HIGH 1 need exact cases, tested
    above): every step with work schedules something, only running requests, and a step
    completing a scored prompt leaves its forks' room; scorers are held now and then; and
    all the traffic finishes."""
    holds = []
    waits = Scheduler._waits_for_forks

    def counted(self, *args):
        held = waits(self, *args)
        holds.append(held)
        return held

    monkeypatch.setattr(Scheduler, "_waits_for_forks", counted)
    rng = random.Random(str(mode))
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    for _ in range(60):
        bm = BlockManager(9, 4)
        kv = PausedKV(PausePolicy(mode, costs), bm, 1, 64) if mode else None
        sched = Scheduler(SchedulerConfig(6, rng.randint(2, 16)), bm, None, kv)
        prefixes = [list(range(k * 100, k * 100 + 8)) for k in (1, 2)]
        left: dict[int, int] = {}  # plain request -> tokens still to decode
        arrivals = 12
        for _ in range(600):
            if arrivals and rng.random() < 0.5:
                arrivals -= 1
                n = rng.randint(3, 16)
                head = rng.choice(prefixes)[: rng.randint(0, 8)]
                priority = rng.randint(-1, 2)
                if rng.random() < 0.4:
                    seq = scored_seq(f"s{arrivals}", n, priority, longest=rng.randint(2, 9))
                else:
                    seq = plain_seq(f"p{arrivals}", n, priority)
                    left[seq.seq_id] = rng.randint(1, 8)
                seq.token_ids[: len(head)] = head
                sched.add(seq)
            for seq in list(sched.paused.values()):
                if rng.random() < 0.3:
                    seq.token_ids.extend([5, 6, 7][: rng.randint(1, 3)])  # the tool's result
                    if rng.random() < 0.3:
                        seq.option_scorer = scored_seq("o", 1, longest=9).option_scorer
                    sched.resume(seq)
            if not (sched.waiting or sched.running):
                continue
            out = sched.schedule()
            assert out.scheduled, (mode, sched.waiting, sched.running)
            assert all(i.seq.status is SequenceStatus.RUNNING for i in out.scheduled)
            assert bm.can_allocate(max(i.reserved for i in out.scheduled))
            for item in out.scheduled:
                seq = item.seq
                seq.num_computed_tokens += item.num_new_tokens
                bm.cache_full_blocks(seq)
                if seq.num_computed_tokens < len(seq):
                    continue
                if seq.option_scorer is not None:
                    sched.finish(seq, FinishReason.STOP)  # scored on its forks' room
                elif left[seq.seq_id] == 1:
                    sched.finish(seq, FinishReason.LENGTH)
                else:
                    left[seq.seq_id] -= 1
                    seq.token_ids.append(7)
                    if rng.random() < 0.2 and len(seq) < 20:
                        sched.pause(seq)
        assert not (sched.waiting or sched.running or sched.paused or arrivals)
    assert any(holds), "no scorer was ever held: the traffic no longer reaches the hold"


@pytest.mark.parametrize("mode", ["preserve", "adaptive", "swap"])
def test_a_multi_step_scored_prompt_nothing_outranks_gets_the_paused_kv_it_counted(mode):
    """REVIEW-sched HIGH 1, scheduler alone: 8 blocks of 4 tokens, 12 tokens a step, no
    prefix caching. A paused request keeps 6 blocks; the runner r (priority 1) holds 1; the
    scored s (priority 0, 12 tokens and forks: more than one step) outranks r, and nothing
    outranks s. The room check counts the paused KV, as s ends up a lone runner, and a lone
    runner frees paused KV under any policy. So s is admitted in this step. Under preserve
    it used to preempt r, then be refused (relief of preserved KV asked for a running
    engine), an empty step on which the engine fails the valid s."""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    costs = PauseCosts(1e-3, 1e-3, 1e-9, 1e-3, 1e-9)
    paused = PausedKV(PausePolicy(mode, costs), bm, 1, 64)
    sched = Scheduler(SchedulerConfig(8, 12), bm, None, paused)
    p = running(sched, plain_seq("p", 24), 23)
    sched.pause(p)
    r = running(sched, plain_seq("r", 4, priority=1), 3)
    s = scored_seq("s", 12, longest=2)
    sched.add(s)
    assert bm.num_free_blocks == 1 and s.num_uncomputed_tokens == 12
    out = sched.schedule()
    assert ("s", 11, 0) in scheduled(out) and ("r", 1, 0) in scheduled(out)
    assert s.status is SequenceStatus.RUNNING and not sched.waiting and not p.block_table
    assert r.status is SequenceStatus.RUNNING and not out.failed
