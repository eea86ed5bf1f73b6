"""Decode attention without padding every sequence to the longest block table."""

from __future__ import annotations

import random

from covey.llm_backend.model_runner import DECODE_PAD_BUDGET, MAX_DECODE_SPANS, _slot_spans
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import Sequence

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SENTENCE = "The river runs past the old mill, and the miller counts the sacks of grain. "
FACTS = (  # a head whose facts a question after it asks for: its answer needs the head's keys
    "The museum's records list each keeper and the animal in their care. Anna Berg keeps a "
    "blue parrot named Kiwi in the east wing. Tomas Lind keeps a grey owl named Pepper by "
    "the library stairs. Mira Holt keeps a red fox named Juniper in the garden shed. Olle "
    "Dahl keeps a white goat named Clover on the roof terrace."
)


def _decoding(length: int, table: list[int]) -> Sequence:
    seq = Sequence(f"r{length}", list(range(1, length + 1)), GREEDY)
    seq.block_table = table
    seq.num_computed_tokens = length - 1  # one token left: a decode
    return seq


def test_groups_pad_only_to_their_own_longest_row(make_engine):
    runner = make_engine().runner
    bs = runner.block_size
    long_a = _decoding(700, list(range(100, 100 + 44)))
    long_b = _decoding(690, list(range(200, 200 + 44)))
    mid_table = [7, 3, 12, 5, *range(300, 315)]  # 5 stretches of pool order: gathered
    mid = _decoding(300, mid_table)
    short = _decoding(10, [50])  # one block in place: read as a view
    groups = runner._decode_groups([long_a, long_b, mid, short])
    assert [(g.start, g.end, g.length) for g in groups] == [(0, 2, 700), (2, 3, 300), (3, 4, 10)]
    first, middle, last = groups
    assert first.blocks.shape == (2, 44) and first.padding.shape == (1, 2, 1, 700)
    assert first.padding[0, 1, 0].sum() == 10  # the 690-token row masks its last 10 keys
    assert middle.blocks.tolist() == [mid_table] and middle.padding is None
    assert last.blocks is None and last.contiguous_start == 50 * bs and last.padding is None
    assert 700 - 300 > DECODE_PAD_BUDGET  # why 300 starts a group of its own
    assert MAX_DECODE_SPANS < 5  # why the 5-stretch row is gathered


def test_a_lone_row_in_a_few_stretches_of_pool_order_is_read_by_its_slot_ranges(make_engine):
    """A cached prefix's blocks, then the sequence's own: two stretches, read by slot range
    (the last cut at the row's keys), not gathered; in order, one slice."""
    runner = make_engine().runner
    bs = runner.block_size
    (group,) = runner._decode_groups([_decoding(5 * bs + 3, [0, 1, 40, 41, 42, 43])])
    assert group.blocks is None and group.contiguous_start is None
    assert group.spans == ((0, 2 * bs), (40 * bs, 43 * bs + 3))
    (group,) = runner._decode_groups([_decoding(3 * bs, [9, 10, 11])])
    assert group.spans is None and group.contiguous_start == 9 * bs
    table = [2 * i for i in range(MAX_DECODE_SPANS + 1)]  # one stretch too many: gathered
    (group,) = runner._decode_groups([_decoding(len(table) * bs, table)])
    assert group.spans is None and group.blocks.tolist() == [table]


def _merged_slots(table: list[int], length: int, bs: int) -> list[tuple[int, int]]:
    """The reference: each key's slot, one by one, merged into runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for slot in (table[p // bs] * bs + p % bs for p in range(length)):
        if runs and runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], slot + 1)
        else:
            runs.append((slot, slot + 1))
    return runs


def test_slot_spans_are_the_rows_slots_merged_into_runs():
    """`_slot_spans` against the slot-by-slot reading of random tables: in pool order, in a
    few stretches, shuffled; lengths ending inside their last block and on its end."""
    rng = random.Random(0)
    for case in range(400):
        bs = (1, 2, 4, 16)[case % 4]
        blocks = rng.randint(1, 12)
        kind = case // 4 % 3
        if kind == 0:  # in pool order
            first = rng.randrange(50)
            table = list(range(first, first + blocks))
        elif kind == 1:  # stretches of pool order (~5 blocks), in any order
            cuts = sorted(rng.sample(range(1, 24), 4))
            pieces = [range(a, b) for a, b in zip([0, *cuts], [*cuts, 24], strict=True)]
            rng.shuffle(pieces)
            table = [b for piece in pieces for b in piece][:blocks]
        else:  # any blocks
            table = rng.sample(range(60), blocks)
        ends_inside = case // 12 % 2 == 0 and bs > 1
        length = (blocks - 1) * bs + (rng.randint(1, bs - 1) if ends_inside else bs)
        runs = _merged_slots(table, length, bs)
        assert list(_slot_spans(table, length, bs, len(table))) == runs  # never capped
        for most in (1, 2, 4):  # capped: the runs while they fit, else None
            capped = _slot_spans(table, length, bs, most)
            assert (None if len(runs) > most else runs) == (capped and list(capped))


def test_a_prompt_after_a_cached_prefix_decodes_by_spans_as_without_the_cache(
    make_engine, monkeypatch
):
    """A prompt alone after another with the same head: its table is the cached head's
    blocks, then its own after the first prompt's, so each decode step reads two stretches
    (`attend_spans`); its greedy tokens are those of an engine without the prefix cache."""
    engine = make_engine()
    bs, tok = engine.runner.block_size, engine.tokenizer
    head = tok.encode(FACTS)[: 4 * bs]  # whole blocks: all of it is a prefix-cache hit
    first = head + tok.encode(" Question: who keeps the fox? Answer:")
    engine.run_to_completion([engine.add_request(first, GREEDY)])
    groups = []
    decode_groups = engine.runner._decode_groups

    def recorded(seqs):
        made = decode_groups(seqs)
        groups.extend(made)
        return made

    monkeypatch.setattr(engine.runner, "_decode_groups", recorded)
    prompt = head + tok.encode(" Question: what is the name of Anna's parrot? Answer:")
    (out,) = engine.run_to_completion([engine.add_request(prompt, GREEDY)])
    assert out.metrics.num_cached_tokens == len(head)
    assert len(groups) == GREEDY.max_tokens - 1
    assert all(g.spans is not None and len(g.spans) == 2 for g in groups)
    alone = make_engine(enable_prefix_caching=False)
    (plain,) = alone.run_to_completion([alone.add_request(prompt, GREEDY)])
    assert out.token_ids == plain.token_ids


def test_mixed_length_batch_equals_one_at_a_time(make_engine):
    # Lengths far enough apart to decode in separate groups; the short one is submitted
    # first, so rows are reordered by length while sampling keeps the request order.
    prompts = ["Hello, my name is", SENTENCE * 4, SENTENCE * 22, SENTENCE * 40]
    engine = make_engine()
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    batched = [o.token_ids for o in engine.run_to_completion(rids)]
    single = []
    for p in prompts:
        alone = make_engine(enable_prefix_caching=False)
        single.append(alone.run_to_completion([alone.add_request(p, GREEDY)])[0].token_ids)
    assert batched == single
    assert all(len(ids) == GREEDY.max_tokens for ids in batched)
