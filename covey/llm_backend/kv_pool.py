"""The paged KV pool: one tensor holding every layer's keys and values, block by block.

Layout [layers, 2, kv_heads, num_blocks * block_size, head_dim]: a slot is one token's
K/V in one block; head-major so gathered keys land in matmul layout (no transposes).
Blocks can be copied (copy-on-write), exported to another tier and imported back, which
is what the chunk store and tool-call pausing build on.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

from covey.errors import ConfigError, InvalidRequestError
from covey.llm_backend.model_args import ModelArgs


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of `shape`; on CPU, memory the OS maps in zero-filled on first touch.

    Zeros, not garbage: a decode group's padded slots are read with weight zero, and a NaN
    left there would make 0 * NaN. But writing them costs: `torch.zeros` touches every page
    up front (an 8192-token float32 engine built, run for 4 tokens and dropped took 0.93 s
    against 0.68 s this way, interleaved on 2 busy cores) at every engine start, and makes
    the whole pool resident at once. An anonymous mapping is zero by the kernel's guarantee
    and only the pages the pool writes become resident: the zeroing moves to the first
    writes, page by page. Private, not shared (mmap's default): private anonymous memory
    is the process's own (a fork would copy it on write), counted as such, and may use
    transparent huge pages, as torch.zeros' memory did. The mapping lives as long as the
    tensor does (frombuffer holds it).
    """
    count = math.prod(shape)
    if device.type != "cpu" or count == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    size = count * dtype.itemsize
    memory = _physical_memory()
    if memory is not None and size > memory:  # torch.zeros failed at start; mapped, the
        # pool would be killed for memory later, as its pages fill in mid-serving
        raise ConfigError(
            f"a KV pool of {size} bytes {tuple(shape)} is larger than this machine's "
            f"memory ({memory} bytes); lower kv_cache_tokens or kv_cache_bytes"
        )
    try:
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    except OSError as e:
        raise ConfigError(
            f"cannot reserve {size} bytes for the KV pool {tuple(shape)}: {e.strerror}; "
            "lower kv_cache_tokens or kv_cache_bytes"
        ) from None
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


def _physical_memory() -> int | None:
    """This machine's RAM in bytes, None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


class KVPool:
    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (args.num_layers, 2, args.num_kv_heads, num_blocks * block_size, args.dim_per_head)
        self.kv = zeroed(shape, dtype, device)  # [L, 2, KVH, S, Dh]

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        return args.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size

    def _blocks_view(self) -> torch.Tensor:
        layers, two, h, _, d = self.kv.shape
        shape = (layers, two, h, self.num_blocks, self.block_size, d)
        return self.kv.view(shape)  # [L, 2, KVH, B, bs, Dh]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        view = self._blocks_view()
        src = torch.tensor([s for s, _ in copies], device=self.kv.device)
        dst = torch.tensor([d for _, d in copies], device=self.kv.device)
        view[:, :, :, dst] = view[:, :, :, src]

    def export_blocks(
        self, block_ids: list[int], device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """A copy of the blocks' KV, [L, 2, KVH, n, bs, Dh], on `device` (another tier)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        return self._blocks_view().index_select(3, index).to(device)

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write KV exported by `export_blocks` into `block_ids` of this pool."""
        view = self._blocks_view()
        expected = (*view.shape[:3], len(block_ids), *view.shape[4:])
        if tuple(data.shape) != expected:
            raise InvalidRequestError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        view.index_copy_(3, index, data.to(device=self.kv.device, dtype=self.kv.dtype))
