from __future__ import annotations

from covey.llm_backend.block_manager import BlockManager
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    n = s.num_uncomputed_tokens
    assert bm.can_allocate(bm.blocks_needed(s, n))
    bm.allocate_slots(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocate_and_free_return_the_pool_to_its_baseline():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    bm.match_prefix(s)
    run_prefill(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_prefix_hit_reuses_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(12)))
    bm.match_prefix(a)
    run_prefill(bm, a)
    b = seq(list(range(12)))
    bm.match_prefix(b)
    assert b.num_cached_tokens == 8  # 12 tokens = 3 blocks, the last is recomputed
    assert b.block_table == a.block_table[:2]
    c = seq(list(range(8)) + [99, 98, 97, 96, 95])
    bm.match_prefix(c)
    assert c.num_cached_tokens == 8
    for s in (a, b, c):
        bm.record_admission(s)
    assert bm.stats.hit_tokens == 16 and bm.stats.queried_tokens == 37


def test_idle_cached_blocks_are_evicted_when_the_free_list_is_empty():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.match_prefix(a)
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4  # two cached-idle blocks count as free
    b = seq([9, 8, 7, 6, 5, 4, 3])
    bm.match_prefix(b)
    run_prefill(bm, b)
    assert len(b.block_table) == 4 and bm.num_free_blocks == 0


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq([1, 2, 3, 4, 5, 6])
    bm.match_prefix(parent)
    run_prefill(bm, parent)
    child = seq([1, 2, 3, 4, 5, 6])
    bm.fork(parent, child)
    assert child.num_computed_tokens == parent.num_computed_tokens == 6
    assert child.block_table == parent.block_table
    child.token_ids.append(7)
    assert bm.blocks_needed(child, 1) == 1  # the copy of the shared partial block
    copies = bm.allocate_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # full blocks stay shared
    assert child.block_table[1] != parent.block_table[1]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_duplicate_blocks_collapse_onto_the_cached_one():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq([1, 2, 3]), seq([1, 2, 3])
    for s in (a, b):
        bm.match_prefix(s)
    for s in (a, b):  # both prefill before either publishes: same tokens, two blocks
        bm.allocate_slots(s, 3)
        s.num_computed_tokens = 3
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert b.block_table[0] == a.block_table[0]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def cached(bm: BlockManager, tokens: list[int]) -> Sequence:
    s = seq(tokens)
    bm.match_prefix(s)
    run_prefill(bm, s)
    bm.free(s)  # its full blocks stay cached, idle
    return s


def test_pins_hold_cached_blocks_through_eviction_until_unpinned():
    bm = BlockManager(num_blocks=8, block_size=2)
    cached(bm, [1, 2, 3, 4, 5])  # two full blocks cached
    cached(bm, list(range(50, 58)))  # four more, idle: 2 blocks are free
    assert bm.pin("sys", [1, 2, 3, 4]) and bm.pin("sys", [9, 9])  # a held key stays as it is
    assert bm.pin("short", [1, 2])  # shares its block with "sys"
    assert bm.pinned == {"sys": 4, "short": 2} and bm.num_pinned_blocks == 2
    assert bm.is_pinned("sys") and not bm.is_pinned("other")
    fill = seq(list(range(100, 111)))  # 6 blocks: the free ones and every idle one
    bm.match_prefix(fill)
    run_prefill(bm, fill)
    assert bm.pinned == {"sys": 4, "short": 2} and bm.cached_prefix_blocks([1, 2, 3, 4]) == 2
    assert bm.cached_prefix_blocks(list(range(50, 58))) == 0  # evicted around the pins
    bm.free(fill)
    assert bm.unpin("sys") and not bm.unpin("sys")
    assert not bm.is_pinned("sys")
    assert bm.num_pinned_blocks == 1  # "short" still holds the shared block
    assert bm.unpin("short") and bm.num_pinned_blocks == 0
    assert bm.num_free_blocks == 8


def test_pins_yield_oldest_first_and_only_as_far_as_needed():
    bm = BlockManager(num_blocks=8, block_size=2)
    cached(bm, [1, 2, 3, 4, 5])  # two full blocks cached, six free
    assert bm.pin("sys", [1, 2, 3, 4]) and bm.pin("short", [1, 2])  # "short" shares [1, 2]
    hog = seq(list(range(100, 113)))  # 7 blocks: the six free and one pinned
    bm.match_prefix(hog)
    run_prefill(bm, hog)
    # "sys", the oldest, yielded: [3, 4] was evicted; [1, 2] stays, held by "short"
    assert bm.pinned == {"short": 2} and not bm.is_pinned("sys")
    assert bm.cached_prefix_blocks([1, 2, 3, 4]) == 1
    assert not bm.unpin("sys") and bm.unpin("short")


def test_only_pinned_blocks_no_sequence_holds_count_as_room_a_pin_can_yield():
    bm = BlockManager(num_blocks=8, block_size=2)
    cached(bm, [1, 2, 3, 4, 5])
    assert bm.pin("sys", [1, 2, 3, 4])
    assert bm.num_free_blocks == 6 and bm.can_allocate(8) and not bm.can_allocate(9)
    reader = seq([1, 2, 3, 4, 5])
    bm.match_prefix(reader)  # shares both pinned blocks: releasing the pin frees nothing
    assert bm.can_allocate(6) and not bm.can_allocate(7)
    bm.free(reader)
    assert bm.can_allocate(8)
    assert bm.unpin("sys") and bm.can_allocate(8) and not bm.can_allocate(9)


def test_a_pin_is_refused_past_its_share_of_the_pool():
    bm = BlockManager(num_blocks=8, block_size=2)  # pins may hold 2 blocks
    cached(bm, [1, 2, 3, 4, 5, 6, 7])  # three full blocks
    assert not bm.pin("too-big", [1, 2, 3, 4, 5, 6])  # 3 blocks > a quarter of 8
    assert bm.pin("fits", [1, 2, 3, 4]) and bm.num_pinned_blocks == 2
    assert not bm.pin("more", [1, 2, 3, 4, 5, 6])  # its third block would pass the share
    assert bm.pinned == {"fits": 4}


def two_pins_and_a_reader() -> tuple[BlockManager, Sequence]:
    """Pins "sys" then "tool", one block each; a running sequence reads "sys"'s block."""
    bm = BlockManager(num_blocks=8, block_size=2)  # pins may hold 2 blocks
    cached(bm, [1, 2, 3])
    cached(bm, [5, 6, 7])
    assert bm.pin("sys", [1, 2]) and bm.pin("tool", [5, 6])
    reader = seq([1, 2, 9, 9, 9])
    bm.match_prefix(reader)
    run_prefill(bm, reader)  # holds "sys"'s block and two of its own: 4 blocks are free
    return bm, reader


def test_a_pin_whose_blocks_sequences_also_hold_does_not_yield():
    bm, reader = two_pins_and_a_reader()
    hog = seq(list(range(100, 109)))  # 5 blocks: the 4 free and one pinned
    bm.match_prefix(hog)
    run_prefill(bm, hog)
    # "sys" is the oldest, but releasing it would free nothing: "tool" yields instead
    assert bm.pinned == {"sys": 2}
    assert reader.block_table[0] == bm.trie.match_prefix([1, 2])[0].block_id


def test_asking_for_a_held_pin_makes_it_the_last_to_yield():
    bm = BlockManager(num_blocks=8, block_size=2)
    cached(bm, [1, 2, 3])
    cached(bm, [5, 6, 7])
    assert bm.pin("sys", [1, 2]) and bm.pin("tool", [5, 6])
    assert bm.pin("sys", [1, 2]) and list(bm.pinned) == ["tool", "sys"]
    assert bm.refresh_pin("tool") and list(bm.pinned) == ["sys", "tool"]
    assert not bm.refresh_pin("other")
    assert bm.pin("sys", [1, 2])
    hog = seq(list(range(100, 113)))  # 7 blocks: the 6 free and one pinned
    bm.match_prefix(hog)
    run_prefill(bm, hog)
    assert bm.pinned == {"sys": 2}  # "tool", the least recently asked for, yielded


def test_discard_frees_blocks_and_forgets_progress():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    bm.match_prefix(s)
    run_prefill(bm, s)
    bm.discard(s)
    assert s.block_table == [] and s.num_computed_tokens == s.num_cached_tokens == 0
    assert bm.num_free_blocks == 8


def test_blocks_freed_or_evicted_are_handed_out_again_in_pool_order():
    """A sequence frees its table last block first and eviction takes a branch's leaves
    first: the next sequence to take those blocks gets them ascending (a table attention
    reads in place), not backwards."""
    bm = BlockManager(num_blocks=8, block_size=2)  # prefix caching: idle, then evicted
    a = seq(list(range(16)))
    bm.match_prefix(a)
    run_prefill(bm, a)
    bm.free(a)
    b = seq(list(range(100, 116)))  # shares nothing: all of a's blocks are evicted
    bm.match_prefix(b)
    run_prefill(bm, b)
    assert b.block_table == list(range(8)) and bm.stats.evicted_blocks == 8

    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq(list(range(16)))
    run_prefill(bm, a)
    bm.free(a)
    b = seq(list(range(16)))
    run_prefill(bm, b)
    assert b.block_table == list(range(8))
