"""The CPU pool starts as zeros without writing them: its memory is an anonymous mapping,
zero-filled by the OS page by page as the pool first writes there (kv_pool.zeroed)."""

from __future__ import annotations

import errno
import gc
import mmap
import os
from pathlib import Path

import pytest
import torch

from covey.errors import ConfigError
from covey.llm_backend.kv_pool import KVPool, zeroed
from covey.llm_backend.model_args import preset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pool_reads_zero_even_where_a_freed_one_was_written(dtype):
    """Padded decode slots are read with weight zero, so garbage there could be a NaN: a
    new pool must be zeros even when the allocator could hand back a dead pool's memory."""
    args = preset("tiny")
    for _ in range(3):
        pool = KVPool(args, 64, 16, dtype, torch.device("cpu"))
        assert pool.kv.shape == (args.num_layers, 2, args.num_kv_heads, 64 * 16, args.dim_per_head)
        assert pool.kv.dtype == dtype and pool.kv.is_contiguous()
        assert not pool.kv.any()
        pool.kv.fill_(float("nan"))
        del pool
        gc.collect()


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_only_the_pages_written_take_memory():
    """A 1 GiB pool costs no memory (and no time writing zeros) until it is used."""
    before = _resident_bytes()
    kv = zeroed((1 << 28,), torch.float32, torch.device("cpu"))  # 1 GiB
    assert _resident_bytes() - before < 64 << 20
    kv[: 1 << 20].fill_(1.0)  # 4 MiB written
    assert _resident_bytes() - before < 64 << 20
    assert float(kv[(1 << 20) - 1]) == 1.0 and float(kv[1 << 20]) == 0.0


def test_a_pool_the_machine_cannot_map_is_a_clear_error(monkeypatch):
    """A mapping the kernel refuses (its overcommit limit): the error names the pool and the
    knobs, not a bare OSError."""

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(ConfigError, match="cannot reserve 4096 bytes for the KV pool"):
        zeroed((1024,), torch.float32, torch.device("cpu"))
    assert zeroed((0, 4), torch.float32, torch.device("cpu")).shape == (0, 4)


def test_a_pool_larger_than_the_machine_is_refused_at_start():
    """Mapped lazily, it would start and be killed for memory later, as it fills."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(ConfigError, match="larger than this machine's memory"):
        zeroed((ram // 4 + 1024,), torch.float32, torch.device("cpu"))
