from __future__ import annotations

import pytest

from covey.cache.block_trie import BlockTrie
from covey.errors import ConfigError


def build(trie: BlockTrie, tokens: list[int], first_block: int, idle: bool = True) -> list:
    """Insert `tokens` block by block; `idle`: then release every block, as a finished
    sequence does (leaf first)."""
    node, nodes = trie.root, []
    for i in range(len(tokens) // trie.block_size):
        key = tuple(tokens[i * trie.block_size : (i + 1) * trie.block_size])
        node, inserted = trie.insert(node, key, first_block + i)
        assert inserted
        nodes.append(node)
    if idle:
        for n in reversed(nodes):
            trie.set_idle(n, True)
    return nodes


def test_match_prefix_returns_longest_full_block_run():
    trie = BlockTrie(block_size=2)
    build(trie, [1, 2, 3, 4, 5, 6], first_block=10)
    assert [n.block_id for n in trie.match_prefix([1, 2, 3, 4, 9, 9])] == [10, 11]
    assert [n.block_id for n in trie.match_prefix([1, 2, 3])] == [10]
    assert trie.match_prefix([2, 1]) == []
    assert [n.block_id for n in trie.match_prefix([1, 2, 3, 4, 5, 6], max_blocks=1)] == [10]


def test_insert_of_existing_key_returns_the_cached_node():
    trie = BlockTrie(block_size=2)
    build(trie, [1, 2], first_block=0)
    node, inserted = trie.insert(trie.root, (1, 2), 7)
    assert not inserted and node.block_id == 0
    with pytest.raises(ValueError, match="must hold 2 tokens"):
        trie.insert(trie.root, (1,), 3)
    with pytest.raises(ConfigError, match="block_size must be > 0"):
        BlockTrie(block_size=0)


def test_evict_takes_least_recently_used_leaves_then_their_parents():
    trie = BlockTrie(block_size=1)
    build(trie, [1, 2, 3], first_block=0)  # chain 0 -> 1 -> 2
    build(trie, [7], first_block=5)
    trie.match_prefix([1, 2, 3])  # the chain is now more recent than block 5
    assert trie.evict(1) == [5]
    assert trie.evict(5) == [2, 1, 0]
    assert trie.num_nodes == 0 and trie.num_evictable == 0


def test_evict_skips_blocks_in_use():
    trie = BlockTrie(block_size=1)
    a, b = build(trie, [1, 2], first_block=0)
    trie.set_idle(b, False)  # a sequence holds leaf 1 again
    assert trie.evict(2) == []  # leaf 1 busy, so its parent stays too
    trie.set_idle(b, True)
    assert trie.evict(2) == [1, 0]


def test_lru_order_follows_every_touch():
    trie = BlockTrie(block_size=1)
    for i in range(6):
        build(trie, [100 + i], first_block=i)
    for i in (3, 0, 4):
        trie.match_prefix([100 + i])  # touched in this order: now the most recent
    assert trie.evict(6) == [1, 2, 5, 3, 0, 4]


def test_eviction_does_not_scan_the_cached_blocks():
    """The nodes an eviction looks at grow with log(cached blocks), not with their number."""
    examined = []
    for n in (1_000, 100_000):
        trie = BlockTrie(block_size=1)
        for i in range(n):
            build(trie, [i], first_block=i)
        for i in range(n // 2):
            trie.match_prefix([i])  # the first half is now the most recent
        before = trie.nodes_examined
        assert trie.evict(10) == list(range(n // 2, n // 2 + 10))
        examined.append(trie.nodes_examined - before)
    # 100x the blocks: log2 grows 10 -> 17, a scan would grow 100x
    assert examined[1] <= 2 * examined[0] and examined[1] <= 10 * 2 * 17
