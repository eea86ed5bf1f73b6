"""A trie over full KV blocks: the prefix cache (SGLang RadixAttention, vLLM APC).

Each node stands for one full block of `block_size` tokens and the pool block holding its
KV; a node's key is that block's tokens, so a lookup compares tokens, never just hashes.
Unlike a radix tree, a node is never split: every edge is exactly one block.

Reference counts live with the block manager, which tells the trie when a cached block
becomes idle (no sequence or pin holds it) or busy again. The eviction candidates, idle
leaves, sit in a binary heap ordered by last access in which each node knows its position,
so a node enters, leaves or moves (when touched) in O(log n), and evicting a block costs
O(log n): never a scan of the trie.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from covey.errors import ConfigError


@dataclass(eq=False)
class BlockNode:
    key: tuple[int, ...]
    block_id: int | None  # None only at the root, which holds no block
    parent: BlockNode | None
    children: dict[tuple[int, ...], BlockNode] = field(default_factory=dict)
    last_access: int = 0
    idle: bool = False  # no sequence or pin references its block
    heap_pos: int | None = None  # index in the LRU heap while it is an eviction candidate

    @property
    def evictable(self) -> bool:
        return self.idle and not self.children and self.parent is not None


class BlockTrie:
    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ConfigError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.root = BlockNode(key=(), block_id=None, parent=None)
        self._clock = itertools.count(1)
        self._lru = _LRUHeap()
        self.num_nodes = 0

    @property
    def num_evictable(self) -> int:
        return len(self._lru.nodes)

    @property
    def nodes_examined(self) -> int:
        """Heap nodes compared so far while ordering candidates (a cost measure)."""
        return self._lru.steps

    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int | None = None
    ) -> list[BlockNode]:
        """Nodes of the longest cached run of full blocks that prefixes `token_ids`.

        Mutates: stamps every matched node as just used, for LRU eviction.
        """
        limit = len(token_ids) // self.block_size
        path = self._walk(token_ids, limit if max_blocks is None else min(max_blocks, limit))
        now = next(self._clock)
        for node in path:
            self._touch(node, now)
        return path

    def peek_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading full blocks of `token_ids` are cached, without stamping them as
        used: a reader that only asks (a replica's cache report) must not change which
        blocks eviction picks."""
        return len(self._walk(token_ids, len(token_ids) // self.block_size))

    def _walk(self, token_ids: Sequence[int], limit: int) -> list[BlockNode]:
        """The cached nodes along `token_ids`' first `limit` full blocks; touches nothing."""
        bs, node, path = self.block_size, self.root, []
        for i in range(limit):
            node = node.children.get(tuple(token_ids[i * bs : (i + 1) * bs]))
            if node is None:
                break
            path.append(node)
        return path

    def insert(
        self, parent: BlockNode, key: tuple[int, ...], block_id: int
    ) -> tuple[BlockNode, bool]:
        """Add `block_id` (referenced, so not idle) as the child of `parent` for `key`.

        Returns (node, inserted); when another block already caches `key` there, that
        node comes back with inserted=False and the caller's block stays private.
        """
        if len(key) != self.block_size:
            raise ValueError(f"a key must hold {self.block_size} tokens, got {len(key)}")
        existing = parent.children.get(key)
        now = next(self._clock)
        if existing is not None:
            self._touch(existing, now)
            return existing, False
        node = BlockNode(key=key, block_id=block_id, parent=parent, last_access=now)
        parent.children[key] = node
        self._lru.discard(parent)  # it has a child now
        self.num_nodes += 1
        return node, True

    def set_idle(self, node: BlockNode, idle: bool) -> None:
        """Record that `node`'s block lost its last reference (idle) or gained one."""
        node.idle = idle
        self._refresh(node)

    def evict(self, num_blocks: int) -> list[int]:
        """Remove up to `num_blocks` idle leaves, least recently used first; return their
        blocks. A parent becomes a candidate once its last child is gone, so whole idle
        branches go."""
        evicted: list[int] = []
        while self._lru.nodes and len(evicted) < num_blocks:
            node = self._lru.pop()
            parent = node.parent
            assert parent is not None and node.block_id is not None
            del parent.children[node.key]
            node.parent = None
            self.num_nodes -= 1
            evicted.append(node.block_id)
            self._refresh(parent)
        return evicted

    def _touch(self, node: BlockNode, now: int) -> None:
        node.last_access = now
        if node.heap_pos is not None:
            self._lru.moved(node)

    def _refresh(self, node: BlockNode) -> None:
        """Make `node`'s membership in the LRU heap match whether it is evictable."""
        if node.evictable:
            if node.heap_pos is None:
                self._lru.push(node)
        else:
            self._lru.discard(node)


class _LRUHeap:
    """A binary min-heap of nodes keyed by (last_access, block_id) in which every node
    records its index, so removing or re-keying any node is O(log n)."""

    def __init__(self) -> None:
        self.nodes: list[BlockNode] = []
        self.steps = 0  # nodes compared by the sifts, for tests and cost accounting

    def push(self, node: BlockNode) -> None:
        node.heap_pos = len(self.nodes)
        self.nodes.append(node)
        self._up(node.heap_pos)

    def pop(self) -> BlockNode:
        top = self.nodes[0]
        self.discard(top)
        return top

    def discard(self, node: BlockNode) -> None:
        i = node.heap_pos
        if i is None:
            return
        node.heap_pos = None
        last = self.nodes.pop()
        if i < len(self.nodes):
            self.nodes[i], last.heap_pos = last, i
            self.moved(last)

    def moved(self, node: BlockNode) -> None:
        """Restore the order after `node`'s key changed."""
        assert node.heap_pos is not None
        self._down(self._up(node.heap_pos))

    @staticmethod
    def _before(a: BlockNode, b: BlockNode) -> bool:
        """Whether `a` is evicted before `b`: older last access first, then lower block id
        (fields compared directly: no key tuples built on this hot path)."""
        if a.last_access != b.last_access:
            return a.last_access < b.last_access
        return a.block_id < b.block_id  # type: ignore[operator]  # never the root

    def _swap(self, i: int, j: int) -> None:
        a, b = self.nodes[i], self.nodes[j]
        self.nodes[i], self.nodes[j] = b, a
        a.heap_pos, b.heap_pos = j, i

    def _up(self, i: int) -> int:
        while i > 0:
            parent = (i - 1) // 2
            self.steps += 1
            if not self._before(self.nodes[i], self.nodes[parent]):
                break
            self._swap(i, parent)
            i = parent
        return i

    def _down(self, i: int) -> int:
        n = len(self.nodes)
        while True:
            smallest = i
            for child in (2 * i + 1, 2 * i + 2):
                if child < n:
                    self.steps += 1
                    if self._before(self.nodes[child], self.nodes[smallest]):
                        smallest = child
            if smallest == i:
                return i
            self._swap(i, smallest)
            i = smallest
