"""How many KV blocks the pool gets: from the config, or from the memory the device has.

An explicit `kv_cache_tokens` or `kv_cache_bytes` wins; otherwise CUDA gets a fraction of
the memory left after loading the weights, and CPU a fixed budget (its memory is shared
with everything else on the machine, so it is not probed).
"""

from __future__ import annotations

import torch

from covey.errors import ConfigError
from covey.llm_backend.config import DEFAULT_CPU_KV_BYTES, DEFAULT_GPU_KV_FRACTION, EngineConfig
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.model_args import ModelArgs


def num_kv_blocks(
    config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device
) -> int:
    """Blocks of `config.block_size` tokens for a model of `args` storing `dtype` KV."""
    block_bytes = KVPool.bytes_per_block(args, config.block_size, dtype)
    if config.kv_cache_tokens is not None:
        blocks = -(-config.kv_cache_tokens // config.block_size)
    elif config.kv_cache_bytes is not None:
        blocks = config.kv_cache_bytes // block_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        blocks = int(free * DEFAULT_GPU_KV_FRACTION) // block_bytes
    else:
        blocks = DEFAULT_CPU_KV_BYTES // block_bytes
    if blocks < 1:
        raise ConfigError(
            f"the KV pool must hold at least one block of {config.block_size} tokens "
            f"({block_bytes} bytes); raise kv_cache_bytes or free device memory"
        )
    return blocks
