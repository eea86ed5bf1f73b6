"""Paused requests' KV in host memory: copied out of the pool and back in, block for block.

The scheduler decides what moves (`paused_kv.py`); this does the copies, each step before
the forward: swap-outs first (they read blocks this step may hand to someone else), then
swap-ins (they write blocks the forward reads).

Overlap, honestly: on CUDA the host copies land in pinned memory and are issued without
blocking the engine thread, in the compute stream's order, so the thread schedules and
samples while the copy engine works; the GPU kernels of the step still follow the copy. On
CPU the pool already lives in host memory: a swap moves KV out of the fixed-size pool into
ordinary memory, a memcpy the engine thread itself performs, overlapped with nothing. The
cost profile measures exactly these copies, so the policy prices them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covey.llm_backend.kv_pool import KVPool


@dataclass
class HostKV:
    data: torch.Tensor  # [L, 2, KVH, n, bs, Dh] on the host
    num_tokens: int

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class KVSwap:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.pinned = pool.kv.device.type == "cuda"
        self._host: dict[int, HostKV] = {}  # seq id -> its KV on the host
        self.bytes_out = 0  # since start
        self.bytes_in = 0

    @property
    def bytes_held(self) -> int:
        return sum(h.num_bytes for h in self._host.values())

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._host

    def swap_out(self, seq_id: int, block_ids: list[int], num_tokens: int) -> None:
        """Copy `block_ids` to host memory as `seq_id`'s KV (blocks read now, in order)."""
        data = self.copy_out(block_ids)
        self._host[seq_id] = HostKV(data, num_tokens)
        self.bytes_out += data.numel() * data.element_size()

    def swap_in(self, seq_id: int, block_ids: list[int]) -> int:
        """Write `seq_id`'s host KV into `block_ids` and forget the host copy; returns the
        tokens restored."""
        host = self._host.pop(seq_id)
        self.copy_in(block_ids, host.data)
        self.bytes_in += host.num_bytes
        return host.num_tokens

    def drop(self, seq_id: int) -> None:
        """Forget `seq_id`'s host KV (its request finished or was aborted)."""
        self._host.pop(seq_id, None)

    def copy_out(self, block_ids: list[int]) -> torch.Tensor:
        gathered = self.pool.export_blocks(block_ids, self.pool.kv.device)
        if not self.pinned:
            return gathered if gathered.device.type == "cpu" else gathered.cpu()
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
        return host

    def copy_in(self, block_ids: list[int], data: torch.Tensor) -> None:
        if self.pinned:
            data = data.to(self.pool.kv.device, non_blocking=True)
        self.pool.import_blocks(block_ids, data)
