"""Paged KV bookkeeping: block tables, reference counts, copy-on-write and the prefix cache.

Plain Python with no torch, so it is tested on its own. Blocks are in one of three states:
free (no owner, not cached), referenced (ref_count > 0) or cached-idle (in the block trie
with ref_count 0: reusable by a later prefix hit, evicted LRU when the free list runs dry).
Pinned prefixes (kept cached across requests, e.g. a system prompt) live here too: a pin
key holds one reference on each of its blocks. A pin is an optimisation, so it yields: when
an allocation needs the room pinned blocks hold, the least recently asked-for pins holding a
block no sequence holds are released (their blocks become idle, evictable) until it fits. A
request therefore fits whenever the whole pool could hold it.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from dataclasses import dataclass

from covey.cache.block_trie import BlockNode, BlockTrie
from covey.errors import ConfigError
from covey.llm_backend.sequence import Sequence

# Pinned prefixes never take more of the KV pool than this, so prefixes pinned for one
# workload cannot crowd out the prefix cache's other entries. Requests fit regardless:
# pins yield to them.
MAX_PINNED_FRACTION = 0.25
_NEVER = sys.maxsize  # a cache cursor past every block: nothing more is published


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.trie = BlockTrie(block_size) if enable_prefix_caching else None
        self.cached_nodes: dict[int, BlockNode] = {}  # block id -> its trie node
        self.num_idle_cached = 0
        self.stats = PrefixCacheStats()
        self._cursor: dict[int, tuple[BlockNode, int]] = {}  # seq id -> (trie node, blocks seen)
        # pin key -> the cached blocks it holds, least recently asked for first
        self._pins: dict[str, list[int]] = {}
        self._pin_counts: Counter[int] = Counter()  # block -> pins holding it
        self._num_pin_only = 0  # pinned blocks no sequence holds: releasing every pin frees them

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get without touching a pin: free ones plus idle cached
        ones (by eviction)."""
        return len(self.free_blocks) + self.num_idle_cached

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so `num_new_tokens` more tokens have slots (plus one for copy-on-write)."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table)) + int(self.needs_copy(seq))

    def fork_blocks_needed(
        self, seq: Sequence, num_new_tokens: int, num_computed_tokens: int | None = None
    ) -> int:
        """Blocks a fork of `seq` takes for `num_new_tokens` tokens of its own: what
        `blocks_needed` gives the fork, whose partly filled last block is shared, so copied.
        `num_computed_tokens`: as `seq` will be once that many of its tokens are computed
        (its slots for them allocated), for a reservation made before they are."""
        computed = seq.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        held = max(len(seq.block_table), -(-computed // self.block_size))
        total = -(-(computed + num_new_tokens) // self.block_size)
        copy = computed % self.block_size != 0 and held * self.block_size > computed
        return max(0, total - held) + int(copy)

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether `num_blocks` can be taken, counting blocks that releasing pins frees."""
        return num_blocks <= self.num_free_blocks + self._num_pin_only

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest block-aligned prefix of a new sequence.

        Mutates `seq` (block_table, num_computed_tokens, num_cached_tokens) and takes a
        reference on each reused block. The last token is never taken from the cache: its
        logits must be computed.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id} already holds blocks")
        if self.trie is None:
            return
        max_blocks = (len(seq) - 1) // self.block_size
        path = self.trie.match_prefix(seq.token_ids, max_blocks)
        for node in path:
            self._incref(node.block_id)
        seq.block_table = [node.block_id for node in path]
        seq.num_computed_tokens = seq.num_cached_tokens = len(path) * self.block_size
        self._cursor[seq.seq_id] = (path[-1] if path else self.trie.root, len(path))

    def cached_prefix_blocks(self, token_ids: list[int]) -> int:
        """How many leading full blocks of `token_ids` the prefix cache holds."""
        return len(self.trie.match_prefix(token_ids)) if self.trie is not None else 0

    def peek_prefix_blocks(self, token_ids: list[int]) -> int:
        """`cached_prefix_blocks` without marking the blocks as used (LRU order unchanged)."""
        return self.trie.peek_prefix(token_ids) if self.trie is not None else 0

    def pin(self, key: str, token_ids: list[int]) -> bool:
        """Hold the cached full blocks of `token_ids`' prefix under `key`, so eviction skips
        them until `unpin(key)` or until an allocation needs their room (pins yield).
        Refused (False; the blocks stay cached, evictable) when pins would then hold more
        than MAX_PINNED_FRACTION of the pool. A key already pinned is kept as it is (True),
        now the most recently asked for."""
        if self.refresh_pin(key):
            return True
        if self.trie is None:
            return False
        blocks = [node.block_id for node in self.trie.match_prefix(token_ids)]
        held = len(self._pin_counts) + sum(1 for b in set(blocks) if b not in self._pin_counts)
        if held > int(self.num_blocks * MAX_PINNED_FRACTION):
            return False
        for block in blocks:
            self._incref(block)
            before = self._pin_only(block)
            self._pin_counts[block] += 1
            self._num_pin_only += self._pin_only(block) - before
        self._pins[key] = blocks
        return True

    def unpin(self, key: str) -> bool:
        """Drop the pin `key`; its idle blocks become evictable again. False if not pinned."""
        blocks = self._pins.pop(key, None)
        if blocks is None:
            return False
        for block in reversed(blocks):
            before = self._pin_only(block)
            self._pin_counts[block] -= 1
            if not self._pin_counts[block]:
                del self._pin_counts[block]
            self._num_pin_only += self._pin_only(block) - before
            self._decref(block)
        return True

    def _pin_only(self, block: int) -> bool:
        """Pinned, and held by nothing else (so releasing its pins frees it)."""
        pins = self._pin_counts.get(block, 0)
        return pins > 0 and self.ref_counts[block] == pins

    def is_pinned(self, key: str) -> bool:
        return key in self._pins

    def refresh_pin(self, key: str) -> bool:
        """Whether `key` is pinned; if it is, it becomes the most recently asked-for pin, so
        it is the last to yield (pins yield least recently asked-for first)."""
        blocks = self._pins.pop(key, None)
        if blocks is None:
            return False
        self._pins[key] = blocks
        return True

    def held_by_one_sequence(self, block: int) -> bool:
        """Whether one sequence is all that holds `block` besides pins: freeing that
        sequence makes the block room, since pins yield."""
        return self.sequence_refs(block) == 1

    def sequence_refs(self, block: int) -> int:
        """References to `block` other than pins': once that many holders let it go it is
        room, since pins yield (a block shared by requests that all go is room too)."""
        return self.ref_counts[block] - self._pin_counts.get(block, 0)

    @property
    def pinned(self) -> dict[str, int]:
        """Pin key -> tokens it holds in the prefix cache."""
        return {k: len(v) * self.block_size for k, v in self._pins.items()}

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by pins (pins of a common prefix share blocks)."""
        return len(self._pin_counts)

    def record_admission(self, seq: Sequence) -> None:
        """Count an admission's prefix lookup in the hit/miss stats (not failed tries; a
        preempted sequence counts again when it is re-admitted)."""
        if self.trie is not None:
            self.stats.queried_tokens += len(seq)
            self.stats.hit_tokens += seq.num_cached_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` slots for `num_new_tokens` more tokens; return block copies to perform.

        A shared, partly filled block is copied first (copy-on-write), so the writer never
        changes another sequence's KV. Call `can_allocate(blocks_needed(...))` first.
        """
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        self._reserve(self.blocks_needed(seq, num_new_tokens))
        copies: list[tuple[int, int]] = []
        if self.needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_table[index], self._take_block()
            self._decref(src)
            seq.block_table[index] = dst
            copies.append((src, dst))
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_block())
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish `seq`'s newly completed blocks in the block trie, for later requests."""
        if self.trie is None:
            return
        node, seen = self._cursor.get(seq.seq_id, (self.trie.root, 0))
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(seen, full):
            block = seq.block_table[i]
            node, inserted = self.trie.insert(
                node, tuple(seq.token_ids[i * bs : (i + 1) * bs]), block
            )
            if inserted:
                self.cached_nodes[block] = node
            elif node.block_id != block:
                # Another sequence cached these tokens first: share its block and free ours,
                # so every node on this sequence's path stays referenced (never evicted).
                self._incref(node.block_id)
                self._decref(block)
                seq.block_table[i] = node.block_id
        self._cursor[seq.seq_id] = (node, max(seen, full))

    def stop_caching(self, seq: Sequence) -> None:
        """Publish none of `seq`'s blocks from here on (blocks already published stay).

        For KV that is not the exact KV of its tokens (blended chunk reuse): those blocks,
        and every block after them, whose KV was computed over them, must never serve a
        prefix-cache hit. The cursor is moved past any block the sequence can ever have.
        """
        if self.trie is None:
            return
        node, _ = self._cursor.get(seq.seq_id, (self.trie.root, 0))
        self._cursor[seq.seq_id] = (node, _NEVER)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of `parent`'s blocks and progress with `child`; writes copy later."""
        if child.block_table:
            raise ValueError(f"sequence {child.request_id} already holds blocks")
        for block in parent.block_table:
            self._incref(block)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        if parent.seq_id in self._cursor:
            self._cursor[child.seq_id] = self._cursor[parent.seq_id]

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its cached blocks stay reusable until evicted. Blocks it
        frees go on the free list in ascending order (`_in_pool_order`)."""
        freed_from = len(self.free_blocks)
        for block in reversed(seq.block_table):
            self._decref(block)
        self._in_pool_order(freed_from)
        seq.block_table = []
        self._cursor.pop(seq.seq_id, None)

    def discard(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and forget its progress: it recomputes from its first
        uncached token when scheduled again (preempted, deferred, or paused KV dropped)."""
        self.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def needs_copy(self, seq: Sequence) -> bool:
        """Whether `seq`'s next token lands in a partly filled block another holder shares,
        so it is copied first (copy-on-write): one block more than its slots."""
        partial = seq.num_computed_tokens % self.block_size
        return (
            partial != 0
            and len(seq.block_table) * self.block_size > seq.num_computed_tokens
            and self.ref_counts[seq.block_table[seq.num_computed_tokens // self.block_size]] > 1
        )

    def _reserve(self, num_blocks: int) -> None:
        """Evict exactly enough idle cached blocks that `num_blocks` can be taken, first
        releasing pins if free and idle blocks alone are too few: least recently asked-for
        first, and only pins holding a block no sequence holds (releasing any other frees
        nothing; the oldest is often a system prompt every running request reads)."""
        short = num_blocks - len(self.free_blocks)
        if short <= 0:
            return  # the common case (a decode inside its last block): nothing to free
        if short > self.num_idle_cached:  # rare: only then is a pin looked at
            for key in list(self._pins):  # least recently asked for first
                if num_blocks <= self.num_free_blocks:
                    break
                if any(self._pin_only(b) for b in self._pins[key]):
                    self.unpin(key)
        if self.num_idle_cached:
            self._evict(short)
        if len(self.free_blocks) < num_blocks:
            raise RuntimeError("KV pool exhausted: check can_allocate before allocate_slots")

    def _take_block(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def _evict(self, num_blocks: int) -> None:
        assert self.trie is not None
        evicted_from = len(self.free_blocks)
        for block in self.trie.evict(num_blocks):
            self.stats.evicted_blocks += 1
            del self.cached_nodes[block]
            self.num_idle_cached -= 1
            self.free_blocks.append(block)
        self._in_pool_order(evicted_from)

    def _in_pool_order(self, start: int) -> None:
        """Sort the free list's entries from `start` on (blocks just freed or evicted).

        Why: the blocks an allocation takes become a sequence's table, and a table in pool
        order is read in place by attention (a slice, or a few stretches), where one out of
        order is gathered block by block. Both sources hand blocks over backwards: a
        sequence frees its table last block first, and eviction takes a branch's leaves
        first. Unsorted, the next sequence to take them got a table in descending order."""
        if len(self.free_blocks) - start > 1:
            tail = sorted(self.free_blocks.pop() for _ in range(len(self.free_blocks) - start))
            self.free_blocks.extend(tail)

    def _incref(self, block: int) -> None:
        if self.ref_counts[block] == 0 and block in self.cached_nodes:
            self.num_idle_cached -= 1
            self.trie.set_idle(self.cached_nodes[block], False)  # type: ignore[union-attr]
        if block in self._pin_counts:  # unpinned blocks, the most, skip the pin bookkeeping
            before = self._pin_only(block)
            self.ref_counts[block] += 1
            self._num_pin_only += self._pin_only(block) - before
        else:
            self.ref_counts[block] += 1

    def _decref(self, block: int) -> None:
        if block in self._pin_counts:  # unpinned blocks, the most, skip the pin bookkeeping
            before = self._pin_only(block)
            self.ref_counts[block] -= 1
            self._num_pin_only += self._pin_only(block) - before
        else:
            self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            node = self.cached_nodes.get(block)
            if node is not None:
                self.num_idle_cached += 1
                self.trie.set_idle(node, True)  # type: ignore[union-attr]
            else:
                self.free_blocks.append(block)
