from __future__ import annotations

import pytest

from covey.cache.radix_tree import RadixTree


def build(tree: RadixTree, tokens: list[int], first_block: int) -> list[int]:
    node, blocks = tree.root, []
    for i in range(len(tokens) // tree.block_size):
        key = tuple(tokens[i * tree.block_size : (i + 1) * tree.block_size])
        node, inserted = tree.insert(node, key, first_block + i)
        assert inserted
        blocks.append(first_block + i)
    return blocks


def test_match_prefix_returns_longest_full_block_run():
    tree = RadixTree(block_size=2)
    build(tree, [1, 2, 3, 4, 5, 6], first_block=10)
    assert [n.block_id for n in tree.match_prefix([1, 2, 3, 4, 9, 9])] == [10, 11]
    assert [n.block_id for n in tree.match_prefix([1, 2, 3])] == [10]
    assert tree.match_prefix([2, 1]) == []
    assert [n.block_id for n in tree.match_prefix([1, 2, 3, 4, 5, 6], max_blocks=1)] == [10]


def test_insert_of_existing_key_returns_the_cached_node():
    tree = RadixTree(block_size=2)
    build(tree, [1, 2], first_block=0)
    node, inserted = tree.insert(tree.root, (1, 2), 7)
    assert not inserted and node.block_id == 0
    with pytest.raises(ValueError, match="must hold 2 tokens"):
        tree.insert(tree.root, (1,), 3)


def test_evict_takes_least_recently_used_leaves_then_their_parents():
    tree = RadixTree(block_size=1)
    build(tree, [1, 2, 3], first_block=0)  # chain 0 -> 1 -> 2
    build(tree, [7], first_block=5)
    tree.match_prefix([1, 2, 3])  # the chain is now more recent than block 5
    assert tree.evict(1, lambda b: True) == [5]
    assert tree.evict(5, lambda b: True) == [2, 1, 0]
    assert tree.num_nodes == 0


def test_evict_skips_blocks_in_use():
    tree = RadixTree(block_size=1)
    build(tree, [1, 2], first_block=0)
    assert tree.evict(2, lambda b: b != 1) == []  # leaf 1 busy, so its parent stays too
    assert tree.evict(2, lambda b: True) == [1, 0]
