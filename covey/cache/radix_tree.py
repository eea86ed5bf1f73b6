"""A radix tree over full KV blocks: the prefix cache (SGLang RadixAttention, vLLM APC).

Each node stands for one full block of `block_size` tokens and the pool block holding its
KV; a node's key is that block's tokens, so a lookup compares tokens, never just hashes.
Reference counts live with the block manager; the tree asks it which blocks are idle.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]
    block_id: int
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    last_access: int = 0


class RadixTree:
    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.root = RadixNode(key=(), block_id=-1, parent=None)
        self._clock = itertools.count(1)
        self.num_nodes = 0

    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int | None = None
    ) -> list[RadixNode]:
        """Nodes of the longest cached run of full blocks that prefixes `token_ids`.

        Mutates: stamps every matched node as just used, for LRU eviction.
        """
        bs = self.block_size
        limit = (
            len(token_ids) // bs if max_blocks is None else min(max_blocks, len(token_ids) // bs)
        )
        node, path, now = self.root, [], next(self._clock)
        for i in range(limit):
            child = node.children.get(tuple(token_ids[i * bs : (i + 1) * bs]))
            if child is None:
                break
            child.last_access = now
            path.append(child)
            node = child
        return path

    def insert(
        self, parent: RadixNode, key: tuple[int, ...], block_id: int
    ) -> tuple[RadixNode, bool]:
        """Add `block_id` as the child of `parent` for `key`.

        Returns (node, inserted); when another block already caches `key` there, that
        node comes back with inserted=False and the caller's block stays private.
        """
        if len(key) != self.block_size:
            raise ValueError(f"a key must hold {self.block_size} tokens, got {len(key)}")
        existing = parent.children.get(key)
        now = next(self._clock)
        if existing is not None:
            existing.last_access = now
            return existing, False
        node = RadixNode(key=key, block_id=block_id, parent=parent, last_access=now)
        parent.children[key] = node
        self.num_nodes += 1
        return node, True

    def evict(self, num_blocks: int, is_idle: Callable[[int], bool]) -> list[int]:
        """Remove up to `num_blocks` idle leaves, least recently used first; return their blocks.

        A parent becomes a candidate once its last child is gone, so whole idle branches go.
        """
        heap = [(n.last_access, id(n), n) for n in self._leaves() if is_idle(n.block_id)]
        heapq.heapify(heap)
        evicted: list[int] = []
        while heap and len(evicted) < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self.num_nodes -= 1
            evicted.append(node.block_id)
            if parent is not self.root and not parent.children and is_idle(parent.block_id):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return evicted

    def _leaves(self) -> list[RadixNode]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves
